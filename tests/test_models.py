"""Model zoo: registry, parameter counts (docs/method.md "Networks"), forward outputs and taps ("Distillation points"),
backbone weight loading and in-path CBAM attention. CPU only, 64×64 inputs."""

from dataclasses import FrozenInstanceError

import pytest
import torch
import torch.nn.functional as F
from torchvision import models as tvm

from attnfd_pipeline.layers import CBAM
from attnfd_pipeline.models import TapSpec, build_model, list_models

ALL_MODELS = [
    "deeplabv3_mobilenetv2",
    "deeplabv3_resnet101",
    "deeplabv3_resnet18",
    "deeplabv3plus_mobilenetv2",
    "deeplabv3plus_resnet101",
    "deeplabv3plus_resnet18",
    "deeplabv3plus_resnet34",
    "deeplabv3plus_resnet50",
    "pspnet_resnet18",
]
H = W = 64


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------- registry
def test_list_models():
    assert list_models() == sorted(ALL_MODELS)


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError) as err:
        build_model("deeplabv3plus_vgg16", 21)
    msg = str(err.value)
    assert "deeplabv3plus_vgg16" in msg
    assert all(name in msg for name in ALL_MODELS)


def test_invalid_output_stride():
    with pytest.raises(ValueError, match="output_stride"):
        build_model("deeplabv3plus_resnet18", 21, output_stride=32)
    with pytest.raises(ValueError, match="output_stride"):
        build_model("deeplabv3plus_mobilenetv2", 21, output_stride=4)


# ---------------------------------------------------------------------------- parameter counts
# (paper, 21 classes; measured count of this implementation = the reference code's modules)
@pytest.mark.parametrize(
    "name, paper, measured, tol",
    [
        ("deeplabv3plus_resnet101", 59.3e6, 59_344_309, 0.01),
        ("deeplabv3plus_resnet18", 16.6e6, 16_608_181, 0.01),
        # The AttnFD reference MobileNetV2 DeepLabV3+ (features[:18], ASPP 320 -> 256, low-level
        # 24 ch) has exactly 5,816,053 parameters: 1.4 % below the paper's rounded "5.9 M".
        ("deeplabv3plus_mobilenetv2", 5.9e6, 5_816_053, 0.015),
        ("pspnet_resnet18", 12.6e6, 12_622_293, 0.01),
    ],
)
def test_parameter_counts(name, paper, measured, tol):
    model = build_model(name, 21)
    count = n_params(model)
    assert count == measured
    assert abs(count - paper) / paper < tol


def test_inpath_attention_parameter_count():
    base = n_params(build_model("deeplabv3plus_resnet18", 21))
    model = build_model("deeplabv3plus_resnet18", 21, inpath_attention=("B", "E", "D"))
    assert n_params(model) - base == 50_540
    assert model.num_parameters() == base
    mbv2 = build_model("deeplabv3plus_mobilenetv2", 21, inpath_attention=["B", "E", "D"])
    assert n_params(mbv2) - n_params(build_model("deeplabv3plus_mobilenetv2", 21)) == 30_368


# ---------------------------------------------------------------------------- forward
def _check_outputs(model, out, x, extra=()):
    n = x.shape[0]
    assert set(out) == {"out", "logits", "B", "E", "D", *extra}
    assert out["out"].shape == (n, model.num_classes, H, W)
    assert out["logits"].shape == (n, model.num_classes, H // model.logits_stride, W // model.logits_stride)
    for point, spec in model.taps.items():
        assert out[point].shape == (n, spec.channels, H // spec.stride, W // spec.stride), point
        assert torch.isfinite(out[point]).all()


@pytest.mark.parametrize(
    "name, output_stride",
    [(n, None) for n in ALL_MODELS]
    + [("deeplabv3plus_resnet18", 8), ("deeplabv3plus_mobilenetv2", 8), ("pspnet_resnet18", 16)],
)
def test_forward_shapes(name, output_stride):
    model = build_model(name, 5, output_stride=output_stride).eval()
    expected_os = output_stride or (16 if name.startswith("deeplabv3plus") else 8)
    assert model.name == name and model.num_classes == 5 and model.output_stride == expected_os
    assert set(model.taps) == {"B", "E", "D"}
    assert all(isinstance(t, TapSpec) for t in model.taps.values())
    assert model.taps["B"].stride == expected_os
    if name.startswith("deeplabv3plus"):
        assert model.taps["E"] == TapSpec(256, expected_os) and model.taps["D"] == TapSpec(256, 4)
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        out = model(x)
    _check_outputs(model, out, x)
    torch.testing.assert_close(
        out["out"], F.interpolate(out["logits"], size=(H, W), mode="bilinear", align_corners=True)
    )


def test_tap_specs():
    assert build_model("deeplabv3plus_resnet101", 21).taps == {
        "B": TapSpec(2048, 16), "E": TapSpec(256, 16), "D": TapSpec(256, 4)
    }
    assert build_model("deeplabv3plus_mobilenetv2", 21).taps["B"] == TapSpec(320, 16)
    assert build_model("pspnet_resnet18", 21).taps == {
        "B": TapSpec(512, 8), "E": TapSpec(512, 8), "D": TapSpec(128, 8)
    }
    with pytest.raises(FrozenInstanceError):
        TapSpec(1, 2).channels = 3


def test_resnet101_multigrid_dilations():
    def dil(layer):
        return [blk.conv2.dilation[0] for blk in layer]

    bb = build_model("deeplabv3plus_resnet101", 21).backbone
    assert dil(bb.layer4) == [2, 4, 8]
    assert all(blk.conv2.padding == blk.conv2.dilation for blk in bb.layer4)
    assert set(dil(bb.layer3)) == {1}
    bb8 = build_model("deeplabv3plus_resnet101", 21, output_stride=8).backbone
    assert dil(bb8.layer4) == [4, 8, 16]
    assert set(dil(bb8.layer3)) == {2}
    assert build_model("deeplabv3plus_resnet101", 21, output_stride=8).aspp.rates == (12, 24, 36)


def test_resnet18_surgery_keeps_torchvision_layout():
    model = build_model("deeplabv3plus_resnet18", 21)
    tv_keys = {k for k in tvm.resnet18(weights=None).state_dict() if not k.startswith("fc.")}
    assert set(model.backbone.state_dict()) == tv_keys
    first = model.backbone.layer4[0]
    assert first.conv1.stride == (1, 1) and first.downsample[0].stride == (1, 1)
    assert all(c.dilation == (2, 2) and c.padding == (2, 2) for c in (first.conv1, first.conv2))


# ---------------------------------------------------------------------------- tap B is pre-ReLU
def _capture_input(module):
    seen = {}
    handle = module.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].clone()))
    return seen, handle


def test_resnet18_b_is_pre_relu_and_head_sees_relu_b():
    model = build_model("deeplabv3plus_resnet18", 21).eval()
    bb = model.backbone
    x = torch.randn(2, 3, H, W)
    seen, handle = _capture_input(model.aspp)
    with torch.no_grad():
        out = model(x)
        # the unmodified torchvision module sequence on the same weights
        y = bb.maxpool(bb.relu(bb.bn1(bb.conv1(x))))
        y = bb.layer4(bb.layer3(bb.layer2(bb.layer1(y))))
    handle.remove()
    b = out["B"]
    assert (b < 0).any()
    torch.testing.assert_close(F.relu(b), y)
    torch.testing.assert_close(seen["x"], y)


def test_resnet50_relu_b_equals_torchvision_layer4():
    model = build_model("deeplabv3plus_resnet50", 21).eval()
    tv = tvm.resnet50(weights=None, replace_stride_with_dilation=[False, False, True]).eval()
    missing, unexpected = tv.load_state_dict(model.backbone.state_dict(), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    x = torch.randn(1, 3, H, W)
    with torch.no_grad():
        b = model(x)["B"]
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        y = tv.layer4(tv.layer3(tv.layer2(tv.layer1(y))))
    assert (b < 0).any()
    torch.testing.assert_close(F.relu(b), y)


def test_mobilenetv2_b_is_320_block_output():
    model = build_model("deeplabv3plus_mobilenetv2", 21).eval()
    assert len(model.backbone.features) == 18
    x = torch.randn(2, 3, H, W)
    seen, handle = _capture_input(model.aspp)
    with torch.no_grad():
        out = model(x)
        y = model.backbone.features(x)
    handle.remove()
    assert (out["B"] < 0).any()  # linear bottleneck: no activation
    torch.testing.assert_close(out["B"], y)
    torch.testing.assert_close(seen["x"], y)


def test_pspnet_feeds_relu_b():
    model = build_model("pspnet_resnet18", 21).eval()
    seen, handle = _capture_input(model.ppm)
    with torch.no_grad():
        out = model(torch.randn(2, 3, H, W))
    handle.remove()
    assert (out["B"] < 0).any()
    torch.testing.assert_close(seen["x"], F.relu(out["B"]))


# ---------------------------------------------------------------------------- backbone weights
def test_backbone_weights_load_resnet18(tmp_path):
    tv = tvm.resnet18(weights=None)
    with torch.no_grad():
        for t in tv.state_dict().values():  # make BN buffers non-default too
            if t.is_floating_point():
                t.add_(torch.rand_like(t))
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(tv.state_dict(), path)
    model = build_model("deeplabv3plus_resnet18", 21, backbone_weights=path)
    saved = torch.load(path, weights_only=True)
    got = model.backbone.state_dict()
    assert set(got) == {k for k in saved if not k.startswith("fc.")}
    for k, v in got.items():
        assert torch.equal(v, saved[k]), k
    # also works as a str path, without the classifier keys, and for PSPNet
    no_fc = tmp_path / "no_fc.pth"
    torch.save({k: v for k, v in saved.items() if not k.startswith("fc.")}, no_fc)
    psp = build_model("pspnet_resnet18", 21, backbone_weights=str(no_fc))
    assert torch.equal(psp.backbone.conv1.weight, saved["conv1.weight"])


def test_backbone_weights_load_mobilenetv2(tmp_path):
    tv = tvm.mobilenet_v2(weights=None)
    path = tmp_path / "mbv2.pth"
    torch.save(tv.state_dict(), path)
    model = build_model("deeplabv3plus_mobilenetv2", 21, backbone_weights=path)
    saved = tv.state_dict()
    got = model.backbone.state_dict()
    assert set(got) == {k for k in saved if k.startswith("features.") and not k.startswith("features.18.")}
    assert all(torch.equal(v, saved[k]) for k, v in got.items())


def test_backbone_weights_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model("deeplabv3plus_resnet18", 21, backbone_weights=path)


def test_backbone_weights_mismatched_keys(tmp_path):
    sd = tvm.resnet18(weights=None).state_dict()
    sd["stem.weight"] = sd.pop("conv1.weight")
    renamed = tmp_path / "renamed.pth"
    torch.save(sd, renamed)
    with pytest.raises(ValueError) as err:
        build_model("deeplabv3plus_resnet18", 21, backbone_weights=renamed)
    assert "renamed.pth" in str(err.value) and "resnet18" in str(err.value)
    assert "conv1.weight" in str(err.value) and "stem.weight" in str(err.value)

    wrong = tmp_path / "resnet34.pth"  # right layout, wrong depth
    torch.save(tvm.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match="resnet34.pth"):
        build_model("deeplabv3plus_resnet18", 21, backbone_weights=wrong)

    shapes = tmp_path / "shapes.pth"
    sd = tvm.resnet18(weights=None).state_dict()
    sd["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(sd, shapes)
    with pytest.raises(ValueError, match="layer1.0.conv1.weight"):
        build_model("deeplabv3plus_resnet18", 21, backbone_weights=shapes)


# ---------------------------------------------------------------------------- parameter groups
@pytest.mark.parametrize("inpath", [None, ("B", "E", "D")])
def test_parameter_groups_partition(inpath):
    model = build_model("deeplabv3plus_resnet18", 21, inpath_attention=inpath)
    bb = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.head_parameters()}
    assert bb and head and not (bb & head)
    assert bb | head == {id(p) for p in model.parameters()}
    assert bb == {id(p) for p in model.backbone.parameters()}
    if inpath:
        assert {id(p) for p in model.attention.parameters()} <= head


# ---------------------------------------------------------------------------- in-path attention
def test_inpath_attention_forward_and_gradients():
    model = build_model("deeplabv3plus_resnet18", 21, inpath_attention=["B", "E", "D"]).train()
    assert list(model.attention) == ["B", "E", "D"]
    assert all(isinstance(m, CBAM) for m in model.attention.values())
    assert model.attention["B"].channels == 512
    x = torch.randn(2, 3, H, W)
    seen, handle = _capture_input(model.aspp)
    out = model(x)
    handle.remove()
    _check_outputs(model, out, x, extra=("B_refined", "E_refined", "D_refined"))
    for p in "BED":
        assert out[f"{p}_refined"].shape == out[p].shape
    torch.testing.assert_close(seen["x"], F.relu(out["B_refined"]))
    F.cross_entropy(out["out"], torch.randint(0, 21, (2, H, W))).backward()
    for name, prm in model.attention.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name


def test_inpath_attention_is_in_the_forward_path():
    model = build_model("pspnet_resnet18", 21, inpath_attention="E").eval()
    assert list(model.attention) == ["E"] and model.attention["E"].channels == 512
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        before = model(x)
        assert set(before) == {"out", "logits", "B", "E", "D", "E_refined"}
        model.attention["E"].channel_gate.mlp[2].bias.add_(3.0)
        after = model(x)
    torch.testing.assert_close(after["E"], before["E"])  # raw tap unchanged
    assert not torch.allclose(after["E_refined"], before["E_refined"])
    assert not torch.allclose(after["out"], before["out"])


def test_inpath_attention_unknown_point():
    with pytest.raises(ValueError, match="X"):
        build_model("deeplabv3plus_resnet18", 21, inpath_attention=["B", "X"])
