import pytest
import torch

from attnfd_pipeline.losses import attnfd_loss


def _pair(seed=0, shape=(3, 4, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def test_batch_norm_matches_reference_code_formula():
    s, t = _pair()
    # the authors' code: x / ||x||_2 over the whole batch tensor, squared diff summed, / batch size
    ref = ((s / s.norm()) - (t / t.norm())).pow(2).sum() / s.shape[0]
    assert attnfd_loss(s, t, "batch").item() == pytest.approx(ref.item(), rel=1e-6)


def test_sample_and_channel_norms_match_their_formulas():
    s, t = _pair(1)
    n = s.shape[0]
    ref = sum(((s[i] / s[i].norm()) - (t[i] / t[i].norm())).pow(2).sum() for i in range(n)) / n
    assert attnfd_loss(s, t, "sample").item() == pytest.approx(ref.item(), rel=1e-6)
    sc = s / s.norm(dim=1, keepdim=True)
    tc = t / t.norm(dim=1, keepdim=True)
    ref = (sc - tc).pow(2).sum(1).mean()
    assert attnfd_loss(s, t, "channel").item() == pytest.approx(ref.item(), rel=1e-6)


def test_each_norm_is_invariant_in_its_unit():
    s, t = _pair(2)
    assert attnfd_loss(7.0 * s, 0.1 * t, "batch").item() == pytest.approx(attnfd_loss(s, t, "batch").item(), rel=1e-5)
    per_sample = torch.tensor([0.5, 3.0, 11.0], dtype=s.dtype).view(3, 1, 1, 1)
    assert attnfd_loss(s * per_sample, t, "sample").item() == pytest.approx(attnfd_loss(s, t, "sample").item(), rel=1e-5)
    per_pixel = torch.rand(3, 1, 5, 6, dtype=s.dtype) + 0.1
    assert attnfd_loss(s * per_pixel, t, "channel").item() == pytest.approx(attnfd_loss(s, t, "channel").item(), rel=1e-5)
    # and batch normalisation is NOT per-sample invariant (it is a different loss)
    assert attnfd_loss(s * per_sample, t, "batch").item() != pytest.approx(attnfd_loss(s, t, "batch").item(), rel=1e-3)


def test_zero_for_identical_and_gradients_flow():
    s, _ = _pair(3)
    for norm in ("batch", "sample", "channel"):
        assert attnfd_loss(s, s.clone(), norm).item() == pytest.approx(0.0, abs=1e-12)
    s, t = _pair(4)
    s.requires_grad_(True)
    attnfd_loss(s, t.half(), "batch").backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_errors():
    s, t = _pair()
    with pytest.raises(ValueError, match="shapes differ"):
        attnfd_loss(s, t[:, :2])
    with pytest.raises(ValueError, match="unknown norm"):
        attnfd_loss(s, t, "l1")
