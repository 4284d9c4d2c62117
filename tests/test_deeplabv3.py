"""DeepLabV3 (no decoder) as the Af-DCD / CIRKD segmentation code builds it (docs/method.md "DeepLabV3"):
parameter counts derived from the released architecture, taps, output strides 8 and 16, and a tiny
teacher → cache → student run on DeepLabV3 at both ends. CPU only, 64×64 inputs."""

import pytest
import torch
import torch.nn.functional as F
from torchvision import models as tvm

from attnfd_pipeline.models import TapSpec, build_model

DLV3 = ["deeplabv3_mobilenetv2", "deeplabv3_resnet101", "deeplabv3_resnet18"]
H = W = 64
NUM_CLASSES = 19  # Cityscapes, the dataset of the released tables

# torchvision's published parameter counts (its model docs: 11,689,512 / 44,549,160 / 3,504,872) minus
# what the segmentation trunk drops: ResNet fc (C_in·1000 + 1000); MobileNetV2's classifier
# (1280·1000 + 1000) and its last 1×1 conv 320 → 1280 with BN (409,600 + 2,560).
TV_TRUNK = {
    "resnet18": 11_689_512 - (512 * 1000 + 1000),
    "resnet101": 44_549_160 - (2048 * 1000 + 1000),
    "mobilenetv2": 3_504_872 - (1280 * 1000 + 1000) - (320 * 1280 + 2 * 1280),
}
# backbone → (trunk output channels, head width C of the released DeepLabV3)
HEAD = {"resnet18": (512, 128), "resnet101": (2048, 256), "mobilenetv2": (320, 128)}


def released_head(c_in: int, c: int, n: int) -> int:
    """Parameters of the released DeepLabV3 head: ASPP 1×1 branch, three 3×3 atrous branches and the
    pooling 1×1 (each conv without bias + BN), the 5C → C projection + BN, the 3×3 C → C conv + BN, and
    the 1×1 classifier with bias."""
    bn = 2 * c
    aspp = (c_in * c + bn) + 3 * (9 * c_in * c + bn) + (c_in * c + bn) + (5 * c * c + bn)
    return aspp + (9 * c * c + bn) + (c * n + n)


def deep_stem_extra(arch: str) -> int:
    """What the released ResNet-v1s trunk has beyond torchvision's: a deep stem (3×3 convs 3→64, 64→64,
    64→128 with BN) instead of the 7×7 3→64 conv + BN, so layer1 starts from 128 channels (its first
    block's input conv and a downsample 1×1 + BN that torchvision's ResNet-18 does not need)."""
    deep = (3 * 64 * 9 + 128) + (64 * 64 * 9 + 128) + (64 * 128 * 9 + 256)
    torchvision_stem = 3 * 64 * 49 + 128
    if arch == "resnet18":  # BasicBlock: 3×3 conv 128→64 instead of 64→64; downsample 128→64 + BN
        layer1 = 9 * 64 * (128 - 64) + (128 * 64 + 128)
    else:  # Bottleneck: 1×1 conv 128→64 instead of 64→64; downsample 128→256 instead of 64→256
        layer1 = 64 * (128 - 64) + 256 * (128 - 64)
    return deep - torchvision_stem + layer1


def aux_head(c3: int, n: int) -> int:
    """The released training-only FCN head on layer3 (3×3 c3 → c3/4 + BN, 1×1 classifier with bias)."""
    mid = c3 // 4
    return 9 * c3 * mid + 2 * mid + mid * n + n


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------- parameter counts
def test_torchvision_trunk_counts():
    """The trunk counts above are torchvision's own modules (a check of the arithmetic, not of our model)."""
    assert TV_TRUNK["resnet18"] == sum(p.numel() for k, p in tvm.resnet18().named_parameters() if "fc" not in k)
    mbv2 = tvm.mobilenet_v2().features[:18]
    assert TV_TRUNK["mobilenetv2"] == sum(p.numel() for p in mbv2.parameters())


@pytest.mark.parametrize("backbone", ["resnet18", "resnet101", "mobilenetv2"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_parameter_counts_match_the_released_architecture(backbone, output_stride):
    """Ours = torchvision trunk + the released head, exactly (dilation adds no parameters, so OS 8 and
    16 count the same)."""
    c_in, c = HEAD[backbone]
    expected = TV_TRUNK[backbone] + released_head(c_in, c, NUM_CLASSES)
    model = build_model(f"deeplabv3_{backbone}", NUM_CLASSES, output_stride=output_stride)
    assert n_params(model) == expected
    assert n_params(model.backbone) == TV_TRUNK[backbone]


def test_released_totals_reproduce_the_published_params():
    """The released networks (deep-stem ResNets, auxiliary head on layer3 for the ResNets) come to the
    CIRKD paper's Params column: 61.1 M (R101), 13.6 M (R18), 3.2 M (MobileNetV2, no auxiliary head).
    Ours differ only by the stem (torchvision's) and the auxiliary head (not built)."""
    published = {"resnet101": 61.1e6, "resnet18": 13.6e6, "mobilenetv2": 3.2e6}
    c3 = {"resnet101": 1024, "resnet18": 256}
    for backbone, params in published.items():
        ours = TV_TRUNK[backbone] + released_head(*HEAD[backbone], NUM_CLASSES)
        released = ours
        if backbone in c3:
            released += deep_stem_extra(backbone) + aux_head(c3[backbone], NUM_CLASSES)
        assert abs(released - params) < 0.05e6, backbone
    assert deep_stem_extra("resnet18") == 148_480 and deep_stem_extra("resnet101") == 123_776


# ---------------------------------------------------------------------------- structure
def test_default_output_stride_and_taps():
    assert build_model("deeplabv3_resnet101", 21).taps == {
        "B": TapSpec(2048, 8), "E": TapSpec(256, 8), "D": TapSpec(256, 8)
    }
    assert build_model("deeplabv3_resnet18", 21, output_stride=16).taps == {
        "B": TapSpec(512, 16), "E": TapSpec(128, 16), "D": TapSpec(128, 16)
    }
    assert build_model("deeplabv3_mobilenetv2", 21).taps == {
        "B": TapSpec(320, 8), "E": TapSpec(128, 8), "D": TapSpec(128, 8)
    }


def test_aspp_rates_and_resnet101_dilation_without_multigrid():
    """Rates 12/24/36 at OS 8 (the released code), 6/12/18 at OS 16; the released ResNet-101 dilates
    layer3 by 2 after a first block at 1, layer4 by 4 after a first block at 2 (no multi-grid)."""
    def dil(layer):
        return [blk.conv2.dilation[0] for blk in layer]

    m8 = build_model("deeplabv3_resnet101", 21)
    assert m8.aspp.rates == (12, 24, 36)
    assert dil(m8.backbone.layer3) == [1] + [2] * 22 and dil(m8.backbone.layer4) == [2, 4, 4]
    m16 = build_model("deeplabv3_resnet18", 21, output_stride=16)
    assert m16.aspp.rates == (6, 12, 18)


@pytest.mark.parametrize("name", DLV3)
@pytest.mark.parametrize("output_stride", [8, 16])
def test_forward_shapes(name, output_stride):
    model = build_model(name, 5, output_stride=output_stride).eval()
    assert model.name == name and model.output_stride == output_stride == model.logits_stride
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        out = model(x)
    assert set(out) == {"out", "logits", "B", "E", "D"}
    s = output_stride
    assert out["logits"].shape == (2, 5, H // s, W // s) and out["out"].shape == (2, 5, H, W)
    for point, spec in model.taps.items():
        assert out[point].shape == (2, spec.channels, H // s, W // s), point
    torch.testing.assert_close(
        out["out"], F.interpolate(out["logits"], size=(H, W), mode="bilinear", align_corners=True)
    )


def _capture_input(module):
    seen = {}
    handle = module.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].clone()))
    return seen, handle


def test_taps_feed_the_next_layer():
    """B is pre-ReLU and the ASPP sees ReLU(B); the head conv sees E (dropout is identity in eval); the
    classifier sees D; logits = classifier(D)."""
    model = build_model("deeplabv3_resnet18", 5).eval()
    hooks = {k: _capture_input(m) for k, m in (("aspp", model.aspp), ("head", model.head),
                                                 ("cls", model.classifier))}
    with torch.no_grad():
        out = model(torch.randn(2, 3, H, W))
    for seen, handle in hooks.values():
        handle.remove()
    assert (out["B"] < 0).any() and (out["D"] >= 0).all() and (out["E"] >= 0).all()
    torch.testing.assert_close(hooks["aspp"][0]["x"], F.relu(out["B"]))
    torch.testing.assert_close(hooks["head"][0]["x"], out["E"])
    torch.testing.assert_close(hooks["cls"][0]["x"], out["D"])
    torch.testing.assert_close(out["logits"], model.classifier(out["D"]))


def test_inpath_attention_on_deeplabv3():
    model = build_model("deeplabv3_mobilenetv2", 5, inpath_attention=("E", "D")).train()
    assert model.attention["E"].channels == 128 and model.attention["D"].channels == 128
    out = model(torch.randn(2, 3, H, W))
    assert {"E_refined", "D_refined"} <= set(out)
    F.cross_entropy(out["out"], torch.randint(0, 5, (2, H, W))).backward()
    assert all(p.grad is not None for p in model.attention.parameters())


def test_unknown_backbone_is_named():
    from attnfd_pipeline.models import build_deeplabv3

    with pytest.raises(ValueError, match="resnet34"):
        build_deeplabv3("resnet34", 21)


# ---------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_teacher_cache_student_on_deeplabv3(tiny_data, tmp_path):
    """Teacher DeepLabV3-R18 → cache → student DeepLabV3-MobileNetV2, every tap at stride 8."""
    from conftest import make_cfg

    from attnfd_pipeline.cache import CacheReader, build_cache, find_cache
    from attnfd_pipeline.data.source import ImageSource
    from attnfd_pipeline.runs import run_student, run_teacher
    from attnfd_pipeline.teacher import load_teacher, load_teacher_info

    cfg = make_cfg(tiny_data, tmp_path, 'teacher.model.name="deeplabv3_resnet18"', "teacher.model.output_stride=8",
                   'student.model.name="deeplabv3_mobilenetv2"', "student.model.output_stride=8",
                   'student.points=["B", "E", "D"]')
    bundle = run_teacher(cfg, progress=False)
    src = ImageSource.from_config(cfg)
    build_cache(cfg, load_teacher(bundle), src, progress=False)
    info = CacheReader(find_cache(cfg, load_teacher_info(bundle), src)).info
    crop = cfg.augment.crop_size[0]
    channels = {"B": 512, "E": 128, "D": 128}
    for point, c in channels.items():
        assert info.targets[point].chw == (c, crop // 8, crop // 8), point
    result = run_student(cfg, progress=False)
    assert result["model"] == "deeplabv3_mobilenetv2" and result["teacher"]["model"] == "deeplabv3_resnet18"
    assert result["targets"] == ["B", "E", "D"] and result["mode"] == "cached"
