"""Distillation methods: each formula against a straightforward computation on tiny tensors, the
registry and method combinations, the cache refusal, and a tiny end-to-end run with cached logits."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from attnfd_pipeline.cache import CacheError
from attnfd_pipeline.config import ConfigError, dump_toml, load_config
from attnfd_pipeline.distill import Distiller
from attnfd_pipeline.losses import (MethodContext, alw_weight, cross_image_relation_loss, get_method, ics_loss,
                                    ics_matrix, kd_loss, list_methods, omni_contrastive_loss, parse_methods,
                                    required_targets)
from attnfd_pipeline.distill import StudentTask, build_distiller, method_weights
from attnfd_pipeline.runs import run_name, run_student, student_dir

torch.set_num_threads(2)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# formulas


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_is_pixelwise_kl_times_t_squared(T):
    s, t = _randn(2, 3, 4, 5, seed=1), _randn(2, 3, 4, 5, seed=2)
    total, count = 0.0, 0
    for n in range(2):
        for y in range(4):
            for x in range(5):
                pt = [math.exp(t[n, c, y, x] / T) for c in range(3)]
                ps = [math.exp(s[n, c, y, x] / T) for c in range(3)]
                pt = [v / sum(pt) for v in pt]
                ps = [v / sum(ps) for v in ps]
                total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
                count += 1
    assert kd_loss(s, t, T).item() == pytest.approx(total / count * T * T, rel=1e-9)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-12)


def test_kd_resizes_student_logits_to_the_teacher():
    s, t = _randn(1, 3, 2, 2, seed=1), _randn(1, 3, 4, 4, seed=2)
    ref = kd_loss(F.interpolate(s, size=(4, 4), mode="bilinear", align_corners=False), t)
    assert kd_loss(s, t).item() == pytest.approx(ref.item(), rel=1e-12)


def test_ics_matrix_is_kl_between_spatial_class_distributions():
    z = _randn(2, 3, 2, 3, seed=3)
    T = 2.0
    m = ics_matrix(z, T)
    for n in range(2):
        dists = []
        for c in range(3):
            e = [math.exp(v / T) for v in z[n, c].flatten().tolist()]
            dists.append([v / sum(e) for v in e])
        for i in range(3):
            for j in range(3):
                kl = sum(a * math.log(a / b) for a, b in zip(dists[i], dists[j]))
                assert m[n, i, j].item() == pytest.approx(kl, rel=1e-9, abs=1e-12)
    s, t = _randn(2, 3, 2, 3, seed=4), z
    ref = ((ics_matrix(t, T) - ics_matrix(s, T)) ** 2).sum() / (2 * 3 * 3)
    assert ics_loss(s, t, T).item() == pytest.approx(ref.item(), rel=1e-12)


def test_aicsd_adaptive_weighting_grows_the_ce_weight():
    from attnfd_pipeline.losses import AICSDConfig

    ctx = MethodContext(("D",), {"D": 8}, {"logits": (3, 4, 4)}, num_classes=3, epochs=4,
                        params=AICSDConfig(ics_weight=2.0, kd_weight=0.5, alw_start=0.5, alw_end=1.0))
    m = get_method("aicsd")(ctx)
    assert [m.ce_weight(e) for e in range(4)] == [0.5, 0.625, 0.75, 0.875]
    assert alw_weight(4, 4, 0.5, 1.0) == 1.0
    s, t = _randn(2, 3, 4, 4, seed=5), _randn(2, 3, 4, 4, seed=6)
    loss, logs = m({"logits": s}, {"logits": t}, epoch=2)
    ref = (1 - 0.75) * (2.0 * ics_loss(s, t).item() + 0.5 * kd_loss(s, t).item())
    assert loss.item() == pytest.approx(ref, rel=1e-9)
    assert logs["ce_weight"] == 0.75
    fixed = get_method("aicsd")(MethodContext(("D",), {"D": 8}, {"logits": (3, 4, 4)}, epochs=4,
                                              params=AICSDConfig(adaptive=False)))
    assert fixed.ce_weight(3) == 1.0
    assert fixed({"logits": s}, {"logits": t})[0].item() == pytest.approx((ics_loss(s, t) + kd_loss(s, t)).item())


def test_lad_is_attnfd_loss_on_raw_features_through_a_connector():
    ctx = MethodContext(("B", "D"), {"B": 4, "D": 3}, {"raw_B": (5, 2, 2), "raw_D": (6, 4, 4)}, norm="channel")
    torch.manual_seed(0)
    lad = get_method("lad")(ctx).double().eval()
    assert lad.targets() == ("raw_B", "raw_D")
    out = {"B": _randn(2, 4, 2, 2, seed=1), "D": _randn(2, 3, 2, 2, seed=2)}  # D needs resizing
    tg = {"raw_B": _randn(2, 5, 2, 2, seed=3), "raw_D": _randn(2, 6, 4, 4, seed=4)}
    ref = 0.0
    for p in ("B", "D"):
        conv, bn = lad.connectors[p]
        y = F.conv2d(out[p], conv.weight)
        y = (y - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
        y = y * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
        y = F.interpolate(y, size=tg[f"raw_{p}"].shape[-2:], mode="bilinear", align_corners=False)
        yc = y / y.norm(dim=1, keepdim=True)
        tc = tg[f"raw_{p}"] / tg[f"raw_{p}"].norm(dim=1, keepdim=True)
        ref += (yc - tc).pow(2).sum(1).mean().item()
    assert lad(out, tg)[0].item() == pytest.approx(ref, rel=1e-6)  # attnfd_loss computes in float32


def _omni_reference(s, t, groups, ph, pw, tau):
    """Af-DCD omni-contrasting by loops: anchors (position, group) of each patch."""
    n, c, h, w = s.shape
    d = c // groups
    losses = []
    for b in range(n):
        for py in range(h // ph):
            for px in range(w // pw):
                rows_s, rows_t, gid = [], [], []
                for y in range(ph):
                    for x in range(pw):
                        for g in range(groups):
                            rows_s.append(s[b, g * d:(g + 1) * d, py * ph + y, px * pw + x])
                            rows_t.append(t[b, g * d:(g + 1) * d, py * ph + y, px * pw + x])
                            gid.append(g)
                for i, a in enumerate(rows_s):
                    pos = -(a - rows_t[i]).abs().sum().item() / tau
                    negs = [-(a - rows_t[j]).abs().sum().item() / tau for j in range(len(rows_t)) if gid[j] != gid[i]]
                    m = max([pos] + negs)
                    lse = m + math.log(sum(math.exp(v - m) for v in [pos] + negs))
                    losses.append(lse - pos)
    return sum(losses) / len(losses)


def test_afdcd_omni_contrastive_loss_matches_the_loop_formula():
    s, t = _randn(2, 8, 4, 6, seed=7), _randn(2, 8, 4, 6, seed=8)
    got = omni_contrastive_loss(s, t, groups=4, patch=2, pool=1, tau=0.5)
    assert got.item() == pytest.approx(_omni_reference(s, t, 4, 2, 2, 0.5), rel=1e-9)
    # pooling first: the same as the loops on max-pooled maps
    s8, t8 = _randn(1, 4, 8, 8, seed=9), _randn(1, 4, 8, 8, seed=10)
    got = omni_contrastive_loss(s8, t8, groups=2, patch=2, pool=2, tau=1.0)
    ref = _omni_reference(F.max_pool2d(s8, 2), F.max_pool2d(t8, 2), 2, 2, 2, 1.0)
    assert got.item() == pytest.approx(ref, rel=1e-9)
    # a map too small for pool × patch: the pooling shrinks, the patch is cut to the map
    tiny_s, tiny_t = _randn(1, 4, 3, 3, seed=11), _randn(1, 4, 3, 3, seed=12)
    got = omni_contrastive_loss(tiny_s, tiny_t, groups=2, patch=4, pool=4, tau=1.0)
    assert got.item() == pytest.approx(_omni_reference(tiny_s, tiny_t, 2, 3, 3, 1.0), rel=1e-9)


def test_afdcd_method_masks_projects_and_contrasts():
    from attnfd_pipeline.losses import AfDCDConfig

    params = AfDCDConfig(recipe="mean", mask_ratio=0.5, fd_weight=2.0, ctr_weight=0.1, groups=2, patch=2, pool=1,
                         tau=1.0)
    ctx = MethodContext(("E",), {"E": 3}, {"raw_E": (4, 4, 4)}, params=params)
    torch.manual_seed(0)
    m = get_method("afdcd")(ctx).double()
    out, tg = {"E": _randn(2, 3, 4, 4, seed=1)}, {"raw_E": _randn(2, 4, 4, 4, seed=2)}
    torch.manual_seed(5)
    loss, logs = m(out, tg)
    torch.manual_seed(5)  # the same mask draw, by hand
    mask = (torch.rand(2, 1, 4, 4) >= 0.5).double()
    rec = m.heads["E"].projector(m.heads["E"].align(out["E"]) * mask)
    fd = (rec - tg["raw_E"]).pow(2).mean().item()
    ctr = _omni_reference(rec.detach(), tg["raw_E"], 2, 2, 2, 1.0)
    assert loss.item() == pytest.approx(2.0 * fd + 0.1 * ctr, rel=1e-9)
    assert logs["fd_E"] == pytest.approx(fd) and logs["ctr_E"] == pytest.approx(ctr)
    loss.backward()
    assert m.heads["E"].align.weight.grad.abs().sum() > 0


def test_cirkd_cross_image_pixel_relations_match_the_pairwise_loop():
    s, t = _randn(3, 4, 2, 3, seed=13), _randn(3, 4, 2, 3, seed=14)
    tau = 0.5
    fs = F.normalize(s.flatten(2), dim=1)
    ft = F.normalize(t.flatten(2), dim=1)
    total = 0.0
    for i in range(3):
        for j in range(3):  # the CIRKD reference: a KL per image pair, batchmean over the pixels of i
            ps = F.log_softmax(fs[i].T @ fs[j] / tau, dim=1)
            pt = F.softmax(ft[i].T @ ft[j] / tau, dim=1)
            total += F.kl_div(ps, pt, reduction="batchmean").item()
    got = cross_image_relation_loss(s, t, tau=tau, pool=1)
    assert got.item() == pytest.approx(total / 9, rel=1e-9)
    pooled = cross_image_relation_loss(s, t, tau=tau, pool=2, pool_mode="max")
    ref = cross_image_relation_loss(F.max_pool2d(s, 2, ceil_mode=True), F.max_pool2d(t, 2, ceil_mode=True),
                                    tau=tau, pool=1)
    assert pooled.item() == pytest.approx(ref.item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# registry, combinations, config


def test_registry_lists_every_method_with_its_targets():
    assert list_methods() == ["attnfd", "kd", "lad", "aicsd", "afdcd", "cirkd", "dist"]
    pts = ("B", "D")
    assert get_method("attnfd").required_targets(pts) == ("B", "D")
    assert get_method("kd").required_targets(pts) == ("logits",)
    assert get_method("aicsd").required_targets(pts) == ("logits",)
    assert get_method("dist").required_targets(pts) == ("logits",)
    assert get_method("lad").required_targets(pts) == ("raw_B", "raw_D")
    assert get_method("afdcd").required_targets(pts) == ("raw_B", "logits")  # released: B after ReLU, with KD
    assert get_method("cirkd").required_targets(pts) == ("raw_E",)  # its own points: after the ASPP head
    assert required_targets("attnfd+kd+lad+aicsd", pts) == ["B", "D", "logits", "raw_B", "raw_D"]
    assert parse_methods(" attnfd + kd ") == ("attnfd", "kd")
    for bad, msg in (("foo", "unknown distillation method 'foo'"), ("kd+kd", "repeats"), ("kd+", "expected names")):
        with pytest.raises(ValueError, match=msg):
            parse_methods(bad)
    for name in list_methods():  # every method module cites its paper
        assert get_method(name).paper
        assert get_method(name).__module__.startswith("attnfd_pipeline.losses.")


def test_config_validates_methods_and_their_sections():
    cfg = load_config(None, ['student.method="attnfd+kd"', "student.kd.weight=0.5", "student.kd.temperature=4"])
    assert method_weights(cfg.student) == {"attnfd": 1.0, "kd": 0.5}
    # the method names are checked by the registry as the config loads, naming the key and the choices
    for spec, msg in (("attnfd+foo", r"student.method: unknown distillation method 'foo'; known: attnfd, .*kd"),
                      ("kd+kd", "student.method: 'kd\\+kd': a method repeats"), ("kd+", "student.method: .*known: ")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [f'student.method="{spec}"'])
    with pytest.raises(ConfigError, match="student.method: names one distillation method"):
        load_config(None, ['student.method=" "'])
    for override, msg in (("student.kd.temperature=0", "student.kd.temperature: must be > 0"),
                          ("student.aicsd.alw_end=0.4", "alw_start <= alw_end"),
                          ("student.afdcd.mask_ratio=1", "student.afdcd.mask_ratio"),
                          ("student.lad.bogus=1", "student.lad.bogus: unknown key")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [override])


def test_a_method_is_one_module_its_section_a_config_key(tmp_path, monkeypatch):
    """A new method declares its section beside its loss; registering it makes ``[student.<name>]`` a config
    table (typed, validated, dumped and read back, with errors naming the file and key) — nothing else changes."""
    import dataclasses
    import pickle

    from attnfd_pipeline.errors import check
    from attnfd_pipeline.losses import base

    plain = load_config(None, ['student.method="attnfd+kd"', "student.kd.temperature=4"])
    assert pickle.loads(pickle.dumps(plain)) == plain  # loader workers and dask receive configs pickled
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    @dataclasses.dataclass(frozen=True)
    class ToySection(base.MethodSection):
        scale: float = 2.0

        def __post_init__(self):
            super().__post_init__()
            check(self.scale > 0, self.key("scale"), "must be > 0")

    @base.register
    class Toy(base.DistillMethod):
        name, label, paper, params_type = "toy", "Toy", "a test", ToySection

        @classmethod
        def required_targets(cls, points, params=None):
            return ("logits",)

        def forward(self, out, targets, epoch=0, batch=None):
            return self.params.scale * (out["logits"].float() - targets["logits"].float()).pow(2).mean(), {}

    cfg_file = tmp_path / "toy.toml"
    cfg_file.write_text('[student]\nmethod = "attnfd+toy"\n\n[student.toy]\nscale = 0.5\nweight = 3\n')
    cfg = load_config(cfg_file)
    assert cfg.student.toy == ToySection(weight=3.0, scale=0.5) and cfg.student.method_params("toy").scale == 0.5
    assert method_weights(cfg.student) == {"attnfd": 1.0, "toy": 3.0}
    assert required_targets(cfg.student.method, cfg.student.points, cfg.student.method_params) == ["B", "E", "D",
                                                                                                    "logits"]
    assert "attnfd+toy" in run_name(cfg) and run_name(cfg) != run_name(load_config(cfg_file, ["student.toy.scale=1"]))
    again = tmp_path / "again.toml"
    again.write_text(dump_toml(cfg))
    assert load_config(again).student == cfg.student and "[student.toy]" in again.read_text()
    for text, msg in (("scale = 0", f"{cfg_file}: student.toy.scale: must be > 0"),
                      ("weight = -1", f"{cfg_file}: student.toy.weight: must be >= 0"),
                      ("bogus = 1", f"{cfg_file}: student.toy.bogus: unknown key"),
                      ("scale = \"x\"", f"{cfg_file}: student.toy.scale: expected a number")):
        cfg_file.write_text(f'[student]\nmethod = "toy"\n\n[student.toy]\n{text}\n')
        with pytest.raises(ConfigError, match=re.escape(msg)):
            load_config(cfg_file)
    with pytest.raises(ConfigError, match=r"student.sections: unknown key"):
        load_config(None, ["student.sections.toy.scale=1"])
    with pytest.raises(ValueError, match="params_type must be its own MethodSection"):
        base.register(type("Bare", (Toy,), {"name": "bare"}))  # a section is the method's own, never shared


def test_run_names_separate_k_and_method_settings():
    base = load_config(None, [])
    assert run_name(base) == "deeplabv3plus_resnet18_attnfd_a2_batch_B-E-D_cached_K4_s0"
    assert run_name(load_config(None, ["cache.K=8"])) != run_name(base)
    kd = load_config(None, ['student.method="attnfd+kd"'])
    kd_t4 = load_config(None, ['student.method="attnfd+kd"', "student.kd.temperature=4"])
    assert "attnfd+kd" in run_name(kd) and run_name(kd) != run_name(kd_t4) and "_p" in run_name(kd_t4)
    assert run_name(load_config(None, ["student.alpha=0"])) == "deeplabv3plus_resnet18_baseline_K4_s0"


def test_rival_weights_do_not_track_alpha_and_old_configs_keep_their_runs(tmp_path):
    """demo.toml's rivals keep their papers' weight 1 at any student.alpha (their own ``alpha``), and a run
    finished under the α-relative spelling (``weight = 1/30`` at α = 30) is the same run: same name, reused."""
    from attnfd_pipeline.config import write_resolved
    from attnfd_pipeline.runs import finished_run_differences

    for alpha in (2, 30, 100):
        s = load_config("configs/demo.toml", [f"student.alpha={alpha}"]).student
        for m in ("kd", "aicsd", "afdcd", "cirkd"):
            assert s.alpha * s.method_weight(m) == pytest.approx(1.0, rel=1e-12)  # rounding of α · (1 / α) only
        assert s.method_weight("attnfd") == s.method_weight("lad") == 1.0  # AttnFD and LAD follow α
    common = [f'runs_root="{tmp_path}"', 'student.method="attnfd+kd"', "student.alpha=30"]
    old = load_config(None, common + [f"student.kd.weight={1 / 30!r}"])
    new = load_config(None, common + ["student.kd.alpha=1"])
    assert run_name(old) == run_name(new) and method_weights(old.student) == method_weights(new.student)
    d = student_dir(old)
    write_resolved(old, d)
    (d / "result.json").write_text(json.dumps({"run": d.name, "final_miou": 0.5, "seed_order": "cycle"}))
    assert finished_run_differences(new) is None
    # another effective weight is another run
    assert student_dir(load_config(None, common + ["student.kd.alpha=2"])) != d


def _tiny_student():
    from attnfd_pipeline.models import build_model

    torch.manual_seed(0)
    return build_model("deeplabv3plus_resnet18", 5)


@pytest.mark.slow
def test_combination_sums_weighted_method_losses_and_trains_every_module():
    cfg = load_config(None, ['student.method="attnfd+kd+lad+aicsd+afdcd+cirkd"', "student.kd.weight=0.5",
                             "student.aicsd.adaptive=false", "student.points=[\"E\", \"D\"]", "student.afdcd.groups=4",
                             'student.afdcd.recipe="mean"'])
    s = cfg.student
    student = _tiny_student()
    x = torch.randn(2, 3, 32, 32)
    shapes = {"E": (16, 2, 2), "D": (16, 8, 8), "raw_E": (16, 2, 2), "raw_D": (16, 8, 8), "logits": (5, 8, 8)}
    d = build_distiller(student, s, shapes, 5)
    assert list(d.methods) == ["attnfd", "kd", "lad", "aicsd", "afdcd", "cirkd"]
    task = StudentTask(d, alpha=2.0, norm=s.norm, weights=method_weights(s))
    assert task.target_names == ["E", "D", "logits", "raw_E", "raw_D"]
    targets = {k: torch.randn(2, *v) for k, v in shapes.items()}
    batch = {"image": x, "label": torch.randint(0, 5, (2, 32, 32)), "targets": targets}
    torch.manual_seed(1)
    loss, logs = task.train_step(batch, epoch=0)
    assert {"ce", "distill", "attnfd", "kd", "lad", "aicsd", "afdcd", "cirkd", "afdcd_fd_D"} <= set(logs)
    expected = sum(task.weights[m] * logs[m] for m in d.methods)
    assert logs["distill"] == pytest.approx(expected, rel=1e-5)
    assert loss.item() == pytest.approx(logs["ce"] + 2.0 * logs["distill"], rel=1e-5)
    loss.backward()
    for name, method in d.methods.items():
        grads = [p.grad for p in method.parameters()]
        assert all(g is not None for g in grads), name
    # the default Distiller is AttnFD, its modules under the names checkpoints and the visualiser use
    plain = Distiller(_tiny_student(), ("E",), {"E": 16})
    assert list(plain.methods) == ["attnfd"] and set(plain.attention) == {"E"} and set(plain.connectors) == {"E"}
    with pytest.raises(AttributeError):
        Distiller(_tiny_student(), ("E",), methods={}).attention


def test_warmup_trains_only_method_modules_and_skips_parameter_free_methods():
    cfg = load_config(None, ['student.method="attnfd+kd"', "student.points=[\"E\"]"])
    shapes = {"E": (16, 2, 2), "logits": (5, 8, 8)}
    d = build_distiller(_tiny_student(), cfg.student, shapes, 5)
    task = StudentTask(d, alpha=1.0, warmup_epochs=1)
    batch = {"image": torch.randn(2, 3, 32, 32), "label": torch.zeros(2, 32, 32, dtype=torch.long),
             "targets": {k: torch.randn(2, *v) for k, v in shapes.items()}}
    loss, logs = task.train_step(batch, epoch=0)
    assert "kd" not in logs and "attnfd" in logs and "ce" not in logs
    loss.backward()
    assert all(p.grad is None for p in d.student.parameters())
    assert all(p.grad is None for p in d.methods["attnfd"].attention.parameters())
    assert all(p.grad is not None for p in d.methods["attnfd"].connectors.parameters())
    only_kd = build_distiller(_tiny_student(), load_config(None, ['student.method="kd"']).student, shapes, 5)
    loss, logs = StudentTask(only_kd, alpha=1.0, warmup_epochs=1).train_step(batch, epoch=0)
    assert "ce" in logs and "kd" in logs  # nothing to warm up: a normal step


# ---------------------------------------------------------------------------------------------
# end to end on a tiny cache with logits and raw features


def _with(cfg, tmp_path, *overrides):
    p = tmp_path / "cfg.toml"
    p.write_text(dump_toml(cfg))
    return load_config(p, list(overrides))


@pytest.fixture(scope="module")
def extra_cache(tiny_pipeline, tmp_path_factory):
    """The shared tiny teacher, and a cache of it with logits and raw features."""
    from attnfd_pipeline.cache import build_cache
    from attnfd_pipeline.data.source import ImageSource
    from attnfd_pipeline.teacher import load_teacher

    cfg, bundle = tiny_pipeline
    tmp = tmp_path_factory.mktemp("methods")
    new = _with(cfg, tmp, f'runs_root="{tmp / "runs"}"', f'cache.root="{tmp / "cache"}"',
                'cache.extra=["logits", "raw"]')
    shutil.copytree(cfg.teacher_dir, new.teacher_dir, dirs_exist_ok=True)
    build_cache(new, load_teacher(bundle), ImageSource.from_config(new), progress=False)
    return new, tmp


@pytest.mark.slow
def test_kd_run_from_a_cache_with_logits_never_loads_the_teacher(extra_cache, monkeypatch):
    cfg, _ = extra_cache
    kd = _with(cfg, extra_cache[1], 'student.method="kd"', "student.alpha=1", "student.kd.temperature=2",
               "student.kd.weight=1")

    def forbidden(*a, **k):
        raise AssertionError("Stage 2 from cache must not load the teacher")

    monkeypatch.setattr("attnfd_pipeline.runs.student.load_teacher", forbidden)
    r = run_student(kd, progress=False)
    assert r["method"] == "kd" and r["methods"] == ["kd"] and r["targets"] == ["logits"] and r["cache"]
    assert r["method_settings"]["kd"]["temperature"] == 2.0 and r["weights"] == {"kd": 1.0}
    assert r["K"] == 2 and r["teacher"]["cbam_mode"] == "inpath" and len(r["per_class_iou"]) == 11
    saved = json.loads((student_dir(kd) / "result.json").read_text())
    assert saved["run"] == r["run"] and len(saved["class_names"]) == 11


@pytest.mark.slow
def test_every_method_combined_runs_end_to_end(extra_cache):
    cfg, tmp = extra_cache
    combo = _with(cfg, tmp, 'student.method="attnfd+kd+lad+aicsd+afdcd+cirkd"', 'student.points=["E", "D"]',
                  "student.afdcd.groups=4", "student.connector_warmup_epochs=1", "student.train.epochs=2")
    r = run_student(combo, progress=False)
    assert r["methods"] == ["attnfd", "kd", "lad", "aicsd", "afdcd", "cirkd"] and r["epochs"] == 2
    assert r["targets"] == ["E", "D", "logits", "raw_E", "raw_D", "raw_B"]  # Af-DCD's released tap: B
    from attnfd_pipeline.engine.train import read_log

    log = read_log(student_dir(combo) / "metrics.parquet")
    assert log[0]["train_ce"] is None and log[1]["train_aicsd"] > 0  # warm-up epoch, then everything


def test_refuses_a_cache_without_the_targets_the_method_needs(extra_cache):
    cfg, tmp = extra_cache
    no_logits = _with(cfg, tmp, 'student.method="kd"', "cache.extra=[]")
    with pytest.raises(CacheError, match=r"needs cached target\(s\) \['logits'\].*cache.extra = \[\"logits\"\]"):
        run_student(no_logits, progress=False)
    no_raw = _with(cfg, tmp, 'student.method="lad"', 'student.points=["B", "E", "D"]', 'cache.extra=["logits"]')
    with pytest.raises(CacheError, match=r"raw_B.*cache.extra = \[\"logits\", \"raw\"\]"):
        run_student(no_raw, progress=False)


@pytest.mark.slow
def test_online_mode_computes_the_targets_every_method_needs(extra_cache):
    cfg, tmp = extra_cache
    online = _with(cfg, tmp, 'student.method="kd+lad"', 'student.mode="online"', 'student.points=["D"]',
                   "cache.extra=[]")  # online: no cache is read, so none needs logits or raw maps
    r = run_student(online, progress=False)
    assert r["mode"] == "online" and r["cache"] is None and r["targets"] == ["logits", "raw_D"]
