"""The rival methods against their authors' released math, re-derived here on fixed tensors (numpy, loops):
each project loss under the released settings equals it to <= 1e-5 relative."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torch.nn.functional as F

from attnfd_pipeline.config import ConfigError, load_config
from attnfd_pipeline.losses import AICSDConfig, DISTConfig, MethodContext, get_method, list_methods
from attnfd_pipeline.losses.aicsd import logit_similarity_loss, pairwise_similarity_loss, released_pixel_kl
from attnfd_pipeline.losses.dist import dist_loss

torch.set_num_threads(2)
REL = 1e-5


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ---------------------------------------------------------------------------------------------
# DIST


def _dist_reference(s, t, beta=1.0, gamma=1.0):
    """Released segmentation DIST: every pixel a sample; 1 − mean Pearson per pixel (across classes) and per
    class (across the batch's pixels)."""
    s, t = s.numpy(), t.numpy()
    ps, pt = _softmax(s, 1), _softmax(t, 1)
    n, c, h, w = s.shape
    pix_s = ps.transpose(0, 2, 3, 1).reshape(-1, c)
    pix_t = pt.transpose(0, 2, 3, 1).reshape(-1, c)
    inter = 1 - np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(pix_s, pix_t)])
    intra = 1 - np.mean([np.corrcoef(pix_s[:, k], pix_t[:, k])[0, 1] for k in range(c)])
    return beta * inter + gamma * intra


def test_dist_equals_the_released_segmentation_loss():
    s, t = _randn(2, 5, 3, 4, seed=1, scale=2), _randn(2, 5, 3, 4, seed=2, scale=2)
    ref = _dist_reference(s, t)
    assert dist_loss(s, t).item() == pytest.approx(ref, rel=REL)
    assert dist_loss(s, t, beta=2.0, gamma=0.5).item() == pytest.approx(_dist_reference(s, t, 2.0, 0.5), rel=REL)
    assert dist_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_dist_temperature_softens_and_scales_by_t_squared():
    s, t = _randn(1, 4, 2, 3, seed=3), _randn(1, 4, 2, 3, seed=4)
    assert dist_loss(s, t, temperature=4.0).item() == pytest.approx(16 * _dist_reference(s / 4, t / 4), rel=REL)


def test_dist_defaults_are_the_released_segmentation_recipe():
    d = DISTConfig()
    assert (d.beta, d.gamma, d.temperature, d.weight) == (1.0, 1.0, 1.0, 1.0)
    assert "dist" in list_methods()
    method = get_method("dist")(MethodContext(("D",), {"D": 8}, {"logits": (5, 3, 4)}))
    assert method.targets() == ("logits",)
    s, t = _randn(2, 5, 3, 4, seed=1), _randn(2, 5, 3, 4, seed=2)
    loss, _ = method({"logits": s.float()}, {"logits": t.half()})
    assert loss.item() == pytest.approx(_dist_reference(s.float().double(), t.half().double()), rel=1e-4)
    cfg = load_config(None, ["student.method=dist", "student.dist.beta=2"])
    assert cfg.student.dist.beta == 2.0


# ---------------------------------------------------------------------------------------------
# AICSD, released variant


def _pool_half(x):
    """Max-pool windows of int(side / 2), starting at every multiple of the window below the side."""
    n, c, h, w = x.shape
    kh, kw = h // 2, w // 2
    rows = [[x[:, :, y:y + kh, z:z + kw].max(axis=(2, 3)) for z in range(0, w, kw)] for y in range(0, h, kh)]
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def _pa_reference(fs, ft):
    s, t = _pool_half(fs.numpy()), _pool_half(ft.numpy())
    n = s.shape[0]
    p = s.shape[2] * s.shape[3]
    total = 0.0
    for b in range(n):
        vs = s[b].reshape(s.shape[1], -1).T
        vt = t[b].reshape(t.shape[1], -1).T
        vs = vs / (np.linalg.norm(vs, axis=1, keepdims=True) + 1e-8)
        vt = vt / (np.linalg.norm(vt, axis=1, keepdims=True) + 1e-8)
        total += ((vt @ vt.T - vs @ vs.T) ** 2).sum()
    return total / p ** 2 / n


def _pi_reference(s, t):
    ls = np.log(_softmax(s.numpy(), 1))
    pt = _softmax(t.numpy(), 1)
    return (pt * (np.log(pt) - ls)).mean()


def _lo_matrix(z):
    p = _softmax(z, 2)  # over H only
    b, c = z.shape[:2]
    m = np.zeros((c, c))
    for i in range(c):
        for j in range(i, c):
            m[i, j] = m[j, i] = (p[:, j] * (np.log(p[:, j]) - p[:, i])).sum() / b
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


def _lo_reference(s, t):
    return ((_lo_matrix(s.numpy()) - _lo_matrix(t.numpy())) ** 2).mean() / s.shape[0]


@pytest.mark.parametrize("side", [7, 8, 33])
def test_aicsd_pairwise_term_equals_the_release(side):
    fs, ft = _randn(2, 3, side, side, seed=5), _randn(2, 6, side, side, seed=6)  # channels may differ
    assert pairwise_similarity_loss(fs, ft).item() == pytest.approx(_pa_reference(fs, ft), rel=REL)


def test_aicsd_pixel_kl_and_logit_similarity_equal_the_release():
    s, t = _randn(2, 4, 6, 5, seed=7, scale=2), _randn(2, 4, 6, 5, seed=8, scale=2)
    assert released_pixel_kl(s, t).item() == pytest.approx(_pi_reference(s, t), rel=REL)
    assert logit_similarity_loss(s, t).item() == pytest.approx(_lo_reference(s, t), rel=REL)
    assert logit_similarity_loss(t, t).item() == pytest.approx(0.0, abs=1e-12)


def _aicsd(**kw):
    params = AICSDConfig(variant="released", **kw)
    return get_method("aicsd")(MethodContext(("D",), {"D": 8, "E": 3}, {"logits": (4, 4, 4), "raw_E": (6, 7, 7)},
                                             epochs=3, params=params))


def test_aicsd_released_total_and_its_adaptive_weighting():
    s_dec, t_dec = _randn(2, 4, 4, 4, seed=9), _randn(2, 4, 4, 4, seed=10)
    up = {k: F.interpolate(v, size=(16, 16), mode="bilinear", align_corners=True) for k, v in
          (("s", s_dec), ("t", t_dec))}
    fs, ft = _randn(2, 3, 7, 7, seed=11), _randn(2, 6, 7, 7, seed=12)
    out, targets = {"out": up["s"], "logits": s_dec, "E": fs}, {"logits": t_dec, "raw_E": ft}
    pi, lo, pa = _pi_reference(up["s"], up["t"]), _lo_reference(up["s"], up["t"]), _pa_reference(fs, ft)
    m = _aicsd(lo_weight=0.3)
    assert m.targets() == ("logits", "raw_E") and m.ce_weight(5) == 1.0
    loss, logs = m(out, targets, epoch=5)
    assert loss.item() == pytest.approx(9500 * pa + 10 * pi + 0.3 * lo, rel=REL)
    alw = _aicsd(lo_weight=0.3, released_alw=True)
    assert alw.targets() == ("logits",)  # the adaptive lines leave the pairwise term out
    assert alw.ce_weight(30) == pytest.approx(0.25) and _aicsd(released_alw=True, alw_epochs=0).ce_weight(1) == 1 / 3
    loss, logs = alw(out, targets, epoch=30)
    assert loss.item() == pytest.approx(0.25 * 0.3 * lo + 0.75 * 10 * pi, rel=REL)
    assert get_method("aicsd").required_targets(("D",)) == ("logits",)  # the paper variant, the default


def test_aicsd_released_settings_are_checked():
    assert (AICSDConfig().pa_weight, AICSDConfig().pi_weight, AICSDConfig().lo_weight) == (9500.0, 10.0, 0.0)
    with pytest.raises(ConfigError, match="student.aicsd.variant"):
        load_config(None, ["student.aicsd.variant=\"both\""])
    with pytest.raises(ConfigError, match="student.aicsd.pa_point"):
        load_config(None, ["student.aicsd.pa_point=\"X\""])


# ---------------------------------------------------------------------------------------------
# CIRKD


def _kl_rows(s_logits, t_logits, T=1.0):
    """Σ_col p_t (log p_t − log p_s) per row, averaged over rows, × T² (numpy)."""
    ps, pt = _softmax(s_logits / T, 1), _softmax(t_logits / T, 1)
    return (pt * (np.log(pt) - np.log(ps))).sum(1).mean() * T * T


def _unit(x, axis):
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def _minibatch_reference(fs, ft, tau=0.1, avg_pool=False):
    s, t = fs.numpy(), ft.numpy()
    if avg_pool:
        s = s.reshape(*s.shape[:2], s.shape[2] // 2, 2, s.shape[3] // 2, 2).mean(axis=(3, 5))
        t = t.reshape(*t.shape[:2], t.shape[2] // 2, 2, t.shape[3] // 2, 2).mean(axis=(3, 5))
    s, t = _unit(s, 1), _unit(t, 1)
    n = s.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            a_s, b_s = s[i].reshape(s.shape[1], -1).T, s[j].reshape(s.shape[1], -1).T
            a_t, b_t = t[i].reshape(t.shape[1], -1).T, t[j].reshape(t.shape[1], -1).T
            total += _kl_rows(a_s @ b_s.T / tau, a_t @ b_t.T / tau)  # batchmean over the rows of image i
    return total / n ** 2


def test_cirkd_minibatch_term_equals_the_release_without_connector_or_pooling():
    from attnfd_pipeline.losses.cirkd import cross_image_relation_loss

    fs, ft = _randn(3, 4, 4, 6, seed=13), _randn(3, 7, 4, 6, seed=14)  # channels differ: no connector needed
    assert cross_image_relation_loss(fs, ft).item() == pytest.approx(_minibatch_reference(fs, ft), rel=REL)
    ref = _minibatch_reference(fs, ft, avg_pool=True)
    assert cross_image_relation_loss(fs, ft, pool=2, pool_mode="avg").item() == pytest.approx(ref, rel=REL)


def test_cirkd_memory_contrast_equals_the_release():
    from attnfd_pipeline.losses.cirkd import memory_contrast_loss

    s, t, bank = (F.normalize(_randn(5, 4, seed=k), dim=1) for k in (15, 16, 17))
    ref = _kl_rows(s.numpy() @ bank.numpy().T / 0.1, t.numpy() @ bank.numpy().T / 0.1, T=2.0)
    assert memory_contrast_loss(s, t, bank, tau=0.1, temperature=2.0).item() == pytest.approx(ref, rel=REL)


def _cirkd(**kw):
    from attnfd_pipeline.losses import CIRKDConfig

    params = CIRKDConfig(**kw)
    ctx = MethodContext(("D",), {"E": 3, "D": 5}, {"raw_E": (4, 4, 4)}, num_classes=3, params=params)
    torch.manual_seed(0)
    return get_method("cirkd")(ctx).double()


def test_cirkd_memory_bank_fills_from_the_batches_teacher_embeddings():
    m = _cirkd(pixel_memory_size=50, region_memory_size=4)
    memory = m.memory["E"]
    t = _randn(2, 4, 4, 4, seed=18)
    labels = torch.full((2, 8, 8), 255, dtype=torch.long)
    labels[0, :4] = 1  # image 0: class 1 in its top half (feature rows 0-1), image 1: class 2 on the left
    labels[1, :, :4] = 2
    memory.enqueue(F.normalize(t, dim=1), F.interpolate(labels[:, None].float(), size=(4, 4))[:, 0].long())
    tn = _unit(t.numpy(), 1)
    np.testing.assert_allclose(memory.regions[1, 0].numpy(), _unit(tn[0, :, :2].reshape(4, -1).mean(1), 0),
                               rtol=1e-6)
    np.testing.assert_allclose(memory.regions[2, 0].numpy(), _unit(tn[1, :, :, :2].reshape(4, -1).mean(1), 0),
                               rtol=1e-6)
    assert memory.regions_ptr.tolist() == [0, 1, 1] and memory.pixels_ptr.tolist() == [0, 8, 8]
    rows = lambda q: {tuple(np.round(v, 6)) for v in q}  # noqa: E731
    assert rows(memory.pixels[1, :8].numpy()) == rows(tn[0, :, :2].reshape(4, -1).T)  # its first 8 positions
    # class 2 fills the left half of image 1: the release pushes the image's first 8 positions (the top two
    # rows), the "class" sampling the class's own pixels
    assert rows(memory.pixels[2, :8].numpy()) == rows(tn[1].reshape(4, -1).T[:8])
    by_class = _cirkd(pixel_memory_size=50, region_memory_size=4, pixel_sampling="class").memory["E"]
    by_class.enqueue(F.normalize(t, dim=1), F.interpolate(labels[:, None].float(), size=(4, 4))[:, 0].long())
    assert rows(by_class.pixels[2, :8].numpy()) == rows(tn[1, :, :, :2].reshape(4, -1).T)


def test_cirkd_total_with_memory_equals_the_release_terms():
    # queues small enough that every step samples all their entries: the loss is then deterministic
    m = _cirkd(pixel_memory_size=8, region_memory_size=2, pixel_contrast_size=30, region_contrast_size=30,
               pixel_update_freq=4, pixel_memory_weight=0.01, region_memory_weight=0.01)
    assert m.targets() == ("raw_E",) and m.connectors is None
    fs, ft = _randn(2, 3, 4, 4, seed=19), _randn(2, 4, 4, 4, seed=20)
    labels = torch.randint(0, 3, (2, 16, 16), generator=torch.Generator().manual_seed(1))
    labels[:, :2] = 255
    loss, logs = m({"E": fs}, {"raw_E": ft}, batch={"label": labels})
    memory = m.memory["E"]
    lab = F.interpolate(labels[:, None].float(), size=(4, 4), mode="nearest")[:, 0].long().flatten().numpy()
    keep = lab != 255
    with torch.no_grad():
        s = _unit(memory.project(fs).numpy(), 1).transpose(0, 2, 3, 1).reshape(-1, 4)[keep]
    t = _unit(ft.numpy(), 1).transpose(0, 2, 3, 1).reshape(-1, 4)[keep]
    terms = []
    for queue in (memory.pixels, memory.regions):
        bank = queue.reshape(-1, 4).numpy()
        terms.append(_kl_rows(s @ bank.T / 0.1, t @ bank.T / 0.1))
    ref = _minibatch_reference(fs, ft) + 0.01 * terms[0] + 0.01 * terms[1]
    assert loss.item() == pytest.approx(ref, rel=REL)
    assert logs["pixel_memory_E"] == pytest.approx(terms[0], rel=REL)


# ---------------------------------------------------------------------------------------------
# Af-DCD, released recipe


def _omni_released(rec, t, groups, patch, tau):
    """Cross-entropy of each anchor's positive among the other-group teacher vectors of its patch, summed,
    ÷ (H · W) ÷ batch (loops)."""
    rec, t = rec.detach().numpy(), t.numpy()
    n, c, h, w = rec.shape
    cg = c // groups
    total = 0.0
    for b in range(n):
        for py in range(0, h, patch):
            for px in range(0, w, patch):
                cells = [(y, x) for y in range(py, py + patch) for x in range(px, px + patch)]
                for (y, x) in cells:
                    for g in range(groups):
                        a = rec[b, g * cg:(g + 1) * cg, y, x]
                        pos = -np.abs(a - t[b, g * cg:(g + 1) * cg, y, x]).sum() / tau
                        neg = [-np.abs(a - t[b, k * cg:(k + 1) * cg, yy, xx]).sum() / tau
                               for (yy, xx) in cells for k in range(groups) if k != g]
                        z = np.array([pos, *neg])
                        total += np.log(np.exp(z - z.max()).sum()) + z.max() - pos
    return total / (h * w) / n


def _kd_reference(s, t):
    return _kl_rows(s.numpy().transpose(0, 2, 3, 1).reshape(-1, s.shape[1]),
                    t.numpy().transpose(0, 2, 3, 1).reshape(-1, t.shape[1]))


def _afdcd(**kw):
    from attnfd_pipeline.losses import AfDCDConfig

    params = AfDCDConfig(**kw)
    shapes = {"raw_B": (8, 4, 4), "raw_D": (8, 4, 4), "logits": (4, 4, 4)}
    ctx = MethodContext(("D",), {"B": 3, "D": 5}, shapes, params=params)
    torch.manual_seed(0)
    return get_method("afdcd")(ctx).double()


@pytest.mark.parametrize("dataset, fd_w, ctr_w, kd_w", [("voc", 1e-6, 5e-3, 1.0), ("ade20k", 1e-6, 0.04, 0.5)])
def test_afdcd_released_recipe_equals_the_release(dataset, fd_w, ctr_w, kd_w):
    m = _afdcd(dataset=dataset, groups=4, patch=2, pool=1)
    assert m.points == ("B",) and m.targets() == ("raw_B", "logits") and m.grad_clip() == 15.0
    fs, ft = _randn(2, 3, 4, 4, seed=21), _randn(2, 8, 4, 4, seed=22)
    zs, zt = _randn(2, 4, 4, 4, seed=23), _randn(2, 4, 4, 4, seed=24)
    torch.manual_seed(7)
    loss, logs = m({"B": fs, "logits": zs}, {"raw_B": ft, "logits": zt})
    torch.manual_seed(7)  # the release's mask on the same draw: zero where u > 1 − ratio
    mask = torch.where(torch.rand(2, 1, 4, 4) > 1 - 0.75, 0, 1).double()
    head = m.heads["B"]
    with torch.no_grad():
        rec = head.projector(head.align(F.relu(fs)) * mask)  # tap after the ReLU, teacher's too
    t = F.relu(ft)
    fd = ((rec - t) ** 2).sum().item() / 2
    ctr = _omni_released(rec, t, 4, 2, 0.07)
    assert logs["fd_B"] == pytest.approx(fd, rel=REL) and logs["ctr_B"] == pytest.approx(ctr, rel=REL)
    assert loss.item() == pytest.approx(fd_w * fd + ctr_w * ctr + kd_w * _kd_reference(zs, zt), rel=REL)


def test_afdcd_released_options_and_the_mean_form():
    from attnfd_pipeline.losses.afdcd import centre_mask, omni_contrastive_loss

    same = _afdcd(points=("B",), projector="enhanced")
    same_ch = get_method("afdcd")(MethodContext(("B",), {"B": 8}, {"raw_B": (8, 4, 4), "logits": (4, 4, 4)},
                                                params=same.params))
    assert isinstance(same_ch.heads["B"].align, torch.nn.Identity)  # the release aligns only differing channels
    assert sum(p.numel() for p in same.heads["B"].projector.parameters()) == 4 * (8 * 8 * 9 + 8)
    mask = centre_mask(torch.zeros(1, 1, 6, 6))
    assert mask.sum() == 36 - 4 and mask[0, 0, 2:4, 2:4].sum() == 0
    s, t = _randn(1, 8, 50, 50, seed=25), _randn(1, 8, 50, 50, seed=26)  # CamVid: crop 44 × 44, no pooling
    crop = omni_contrastive_loss(s, t, groups=2, patch=4, pool=4, crop=44, sums=True)
    ref = omni_contrastive_loss(s[:, :, :44, :44], t[:, :, :44, :44], groups=2, patch=4, pool=1, sums=True)
    assert crop.item() == pytest.approx(ref.item(), rel=1e-12)
    mean_sum = omni_contrastive_loss(s[:, :, :8, :8], t[:, :, :8, :8], groups=2, patch=4, pool=1)
    released = omni_contrastive_loss(s[:, :, :8, :8], t[:, :, :8, :8], groups=2, patch=4, pool=1, sums=True)
    assert released.item() == pytest.approx(2 * mean_sum.item(), rel=1e-12)  # the release's sum = M × the mean
    mean = _afdcd(recipe="mean")
    assert mean.points == ("D",) and mean.targets() == ("raw_D",) and mean.grad_clip() == 0.0
    camvid = _afdcd(dataset="camvid")
    assert (camvid.recipe.fd, camvid.recipe.ctr, camvid.recipe.kd, camvid.recipe.crop) == (8e-6, 0.01, 1.0, 44)


def test_afdcd_module_gradients_are_clipped_at_15():
    from attnfd_pipeline.distill import StudentTask, build_distiller
    from attnfd_pipeline.engine.train import clip_task_gradients
    from attnfd_pipeline.models import build_model

    cfg = load_config(None, ['student.method="afdcd"', "student.afdcd.groups=4", "student.afdcd.fd_weight=1e3"])
    torch.manual_seed(0)
    student = build_model("deeplabv3plus_resnet18", 5)
    shapes = {"raw_B": (16, 2, 2), "logits": (5, 8, 8)}
    task = StudentTask(build_distiller(student, cfg.student, shapes, 5), alpha=1.0)
    batch = {"image": torch.randn(2, 3, 32, 32), "label": torch.randint(0, 5, (2, 32, 32)),
             "targets": {k: 10 * torch.randn(2, *v) for k, v in shapes.items()}}
    loss, _ = task.train_step(batch, 0)
    loss.backward()
    params = list(task.distiller.methods["afdcd"].parameters())
    norm = lambda: torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()  # noqa: E731
    assert norm() > 15 and task.clips_gradients
    clip_task_gradients(task, None, None)
    assert norm() == pytest.approx(15.0, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# the registry is where the method facts live


def test_every_registered_method_has_its_config_section_label_and_citation():
    import dataclasses

    from attnfd_pipeline.config import StudentConfig
    from attnfd_pipeline.experiments import accuracy, report
    from attnfd_pipeline.losses import MethodSection, method_label, method_sections

    assert list(method_sections()) == list_methods() == list(StudentConfig().sections)
    for name in list_methods():
        cls = get_method(name)
        section = getattr(StudentConfig(), name)
        assert type(section) is cls.params_type and isinstance(section, MethodSection), name
        assert section.method == name and {"weight", "alpha"} <= {f.name for f in dataclasses.fields(section)}, name
        assert cls.label and cls.paper and report.row_label(name) == f"S + {method_label(name)}" == f"S + {cls.label}"
        assert report.USES[name] == set(cls.uses)
    assert report.row_label("afdcd+kd", "online") == "S + Af-DCD + KD (online)" and accuracy.LABELS["dist"] == "S + DIST"
    assert report.METHOD_ORDER[-1] == "attnfd" and "dist" in report.METHOD_ORDER


def test_aicsd_paper_runs_keep_their_names_and_the_released_variant_gets_its_own():
    from attnfd_pipeline.runs import run_name

    def name(*sets):
        return run_name(load_config("configs/demo.toml", ['student.method="aicsd"', *sets]))

    assert name() == "deeplabv3plus_resnet18_aicsd_a30_batch_D_cached_K4_p6031d366_s0"  # bench/accuracy.json's run
    assert name('student.aicsd.variant="released"') not in (name(), name('student.aicsd.variant="paper"'))
    assert name("student.aicsd.pa_weight=9500") == name()  # a key at its default names nothing
