"""The rival methods against their authors' released math, re-derived here on fixed tensors (numpy, loops):
each project loss under the released settings equals it to <= 1e-5 relative."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnfd_pipeline.config import DISTConfig, load_config
from attnfd_pipeline.losses import MethodContext, get_method, list_methods
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
