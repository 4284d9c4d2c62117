"""CBAM / parameter-free CBAM: parameter totals (paper Table 6) and the gate maths (eq. 2-5)."""

import pytest
import torch
import torch.nn.functional as F

from attnfd_pipeline.layers import CBAM, ChannelGate, ParameterFreeCBAM, SpatialGate, build_attention


def n_params(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


def test_cbam_parameter_totals_match_paper_table6():
    assert n_params(CBAM(512), CBAM(256), CBAM(256)) == 50_540  # ResNet-18 student: B, E, D
    assert n_params(CBAM(320), CBAM(256), CBAM(256)) == 30_368  # MobileNetV2 student


def test_parameter_free_cbam_has_no_parameters_and_keeps_shape():
    m = ParameterFreeCBAM()
    assert n_params(m) == 0
    x = torch.randn(2, 5, 6, 7)
    assert m(x).shape == x.shape


def _randomise(cbam: CBAM) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in cbam.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        cbam.spatial_gate.bn.running_mean.fill_(0.3)
        cbam.spatial_gate.bn.running_var.fill_(1.7)


def test_cbam_matches_hand_computed_reference():
    torch.manual_seed(0)
    c, r = 8, 4
    cbam = CBAM(c, reduction=r).double().eval()
    _randomise(cbam)
    x = torch.randn(2, c, 3, 5, dtype=torch.float64)

    # channel gate: shared MLP on avg- and max-pooled descriptors, summed, sigmoid
    w1 = cbam.channel_gate.mlp[0].weight.view(c // r, c)
    b1 = cbam.channel_gate.mlp[0].bias
    w2 = cbam.channel_gate.mlp[2].weight.view(c, c // r)
    b2 = cbam.channel_gate.mlp[2].bias

    def mlp(v):
        return torch.relu(v @ w1.T + b1) @ w2.T + b2

    avg = x.mean(dim=(2, 3))
    mx = x.flatten(2).max(dim=2).values
    mc = torch.sigmoid(mlp(avg) + mlp(mx))[:, :, None, None]
    f1 = mc * x
    # spatial gate: [channel-max, channel-mean] -> 7x7 conv (no bias) -> BN (eval) -> sigmoid
    pooled = torch.stack([f1.max(dim=1).values, f1.mean(dim=1)], dim=1)
    conv = F.conv2d(pooled, cbam.spatial_gate.conv.weight, padding=3)
    bn = cbam.spatial_gate.bn
    y = (conv - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    ms = torch.sigmoid(y)
    expected = ms * f1

    with torch.no_grad():
        out = cbam(x)
        got_mc, got_ms = cbam.attention_maps(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_mc, mc, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_ms, ms, atol=1e-6, rtol=0)
    assert got_mc.shape == (2, c, 1, 1) and got_ms.shape == (2, 1, 3, 5)


def test_parameter_free_cbam_matches_reference():
    x = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    mc = torch.sigmoid(x.mean(dim=(2, 3), keepdim=True) + x.amax(dim=(2, 3), keepdim=True))
    f1 = mc * x
    ms = torch.sigmoid(f1.amax(dim=1, keepdim=True) + f1.mean(dim=1, keepdim=True))
    m = ParameterFreeCBAM()
    torch.testing.assert_close(m(x), ms * f1, atol=1e-6, rtol=0)
    got_mc, got_ms = m.attention_maps(x)
    torch.testing.assert_close(got_mc, mc, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_ms, ms, atol=1e-6, rtol=0)


def test_gate_shapes_and_structure():
    g = ChannelGate(32, reduction=16)
    assert g(torch.randn(2, 32, 4, 4)).shape == (2, 32, 1, 1)
    assert all(conv.bias is not None for conv in (g.mlp[0], g.mlp[2]))
    s = SpatialGate()
    assert s(torch.randn(2, 32, 4, 4)).shape == (2, 1, 4, 4)
    assert s.conv.bias is None and s.conv.kernel_size == (7, 7) and s.conv.padding == (3, 3)


def test_cbam_gradients_flow():
    m = CBAM(32).train()
    x = torch.randn(2, 32, 4, 4, requires_grad=True)
    m(x).square().sum().backward()
    assert x.grad is not None
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_build_attention():
    assert isinstance(build_attention("cbam", 64), CBAM)
    assert n_params(build_attention("cbam", 64, reduction=8)) == n_params(CBAM(64, reduction=8))
    assert isinstance(build_attention("parameter_free", 64), ParameterFreeCBAM)
    with pytest.raises(ValueError, match="bogus"):
        build_attention("bogus", 64)
