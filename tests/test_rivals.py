"""The rival methods against their authors' released math, re-derived here on fixed tensors (numpy, loops):
each project loss under the released settings equals it to <= 1e-5 relative."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torch.nn.functional as F

from attnfd_pipeline.config import AICSDConfig, ConfigError, DISTConfig, load_config
from attnfd_pipeline.losses import MethodContext, get_method, list_methods
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
