"""Replayable augmentation: a pure parameter draw keyed by (global seed, image index, aug seed) and a
pure apply with ``torchvision.transforms.v2.functional``.

Recipe (docs/method.md "Training recipe", reference order): horizontal flip p=0.5 → random scale of the short side in
[scale_min, scale_max] × base_size (bilinear + antialias image, nearest mask) → pad right/bottom to
the crop size (image 0, mask 255) → random crop → Gaussian blur with p=0.5 and sigma ~ U(0, r_max)
→ ImageNet normalisation. The draw never touches the global RNGs (``random``, ``np.random``,
``torch``), so Stage 2 can rebuild exactly the crop Stage 1 fed to the teacher.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from attnfd_pipeline.config import AugmentConfig
from attnfd_pipeline.utils import blake2b_hex
from attnfd_pipeline.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Teacher training draws fresh augmentations every epoch; keying them with aug seeds from this offset
# keeps them replayable while never colliding with the K cached seeds [0, K).
ONLINE_AUG_OFFSET = 1_000_000


@dataclass(frozen=True)
class AugmentParams:
    """Everything needed to rebuild one augmented crop. Stored column-by-column in the manifest."""

    flip: bool
    resized_h: int  # size after the random scale
    resized_w: int
    pad_bottom: int  # padding added so the crop fits (image 0, mask 255)
    pad_right: int
    crop_top: int
    crop_left: int
    crop_h: int
    crop_w: int
    blur_sigma: float  # 0.0 = no blur

    def as_dict(self) -> dict:
        return asdict(self)


def draw(cfg: AugmentConfig, image_index: int, aug_seed: int, image_hw: tuple[int, int]) -> AugmentParams:
    """Draw the augmentation of image ``image_index`` under ``aug_seed``: a pure function of
    (cfg.seed, image_index, aug_seed, image size, recipe)."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, image_index, aug_seed]))
    # Draw every random number unconditionally, in a fixed order, so one knob never shifts another.
    u_flip, u_blur, u_sigma, u_top, u_left = rng.random(5)
    short = int(rng.integers(int(cfg.base_size * cfg.scale_min), int(cfg.base_size * cfg.scale_max) + 1))
    h, w = image_hw
    if h <= w:
        rh, rw = short, max(1, int(round(w * short / h)))
    else:
        rh, rw = max(1, int(round(h * short / w))), short
    ch, cw = cfg.crop_size
    pad_bottom, pad_right = max(ch - rh, 0), max(cw - rw, 0)
    ph, pw = rh + pad_bottom, rw + pad_right
    top = min(int(u_top * (ph - ch + 1)), ph - ch)
    left = min(int(u_left * (pw - cw + 1)), pw - cw)
    sigma = float(u_sigma * cfg.blur_radius_max) if u_blur < cfg.blur_p else 0.0
    return AugmentParams(
        flip=bool(u_flip < cfg.flip_p),
        resized_h=rh,
        resized_w=rw,
        pad_bottom=pad_bottom,
        pad_right=pad_right,
        crop_top=top,
        crop_left=left,
        crop_h=ch,
        crop_w=cw,
        blur_sigma=round(sigma, 6),
    )


# Implementations of ``apply`` (the draw is shared), chosen by ``augment.impl``. A cache records the one it was
# built with (in ``cache.json``'s augment inputs, absent = 1) and replays with it, since its stored hashes are of
# that implementation's bytes:
# 1 — the whole image resized to the drawn scale, then padded, cropped and blurred (torchvision);
# 2 — only the region the crop keeps is resampled, with the same antialiased bilinear filter and nearest rule
#     evaluated at the crop's own output pixels (``resample_region``), and the blur runs as separable passes:
#     about half the CPU of 1 at 513 px. Its labels equal 1's; its images differ from 1's by the rounding of
#     the filter arithmetic (at most 1 level on a uint8 pixel, measured in tests/test_augment.py).
AUGMENT_IMPLS = (1, 2)
AUGMENT_IMPL = AUGMENT_IMPLS[-1]  # the newest (the paper recipes use it)


def apply(params: AugmentParams, image: torch.Tensor, label: torch.Tensor, *,
          impl: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``params`` to a uint8 image (3,H,W) and a uint8 label (H,W) with implementation ``impl``;
    returns uint8 tensors of the crop size. Pure: the output depends on the inputs only."""
    if impl == 2:
        return _apply_region(params, image, label)
    if impl != 1:
        raise UserError(f"unknown augmentation implementation {impl!r} (known: {AUGMENT_IMPLS})")
    mask = tv_tensors.Mask(label.unsqueeze(0))
    if params.flip:
        image, mask = TF.horizontal_flip(image), TF.horizontal_flip(mask)
    size = [params.resized_h, params.resized_w]
    image = TF.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    mask = TF.resize(mask, size, interpolation=InterpolationMode.NEAREST)
    if params.pad_bottom or params.pad_right:
        padding = [0, 0, params.pad_right, params.pad_bottom]  # left, top, right, bottom
        image = TF.pad(image, padding, fill=0)
        mask = TF.pad(mask, padding, fill=255)
    image = TF.crop(image, params.crop_top, params.crop_left, params.crop_h, params.crop_w)
    mask = TF.crop(mask, params.crop_top, params.crop_left, params.crop_h, params.crop_w)
    if params.blur_sigma > 0:
        k = 2 * math.ceil(3 * params.blur_sigma) + 1
        image = TF.gaussian_blur(image, kernel_size=[k, k], sigma=[params.blur_sigma, params.blur_sigma])
    return image.contiguous(), mask.as_subclass(torch.Tensor)[0].contiguous()


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Implementation 2's Gaussian blur: torchvision's kernel (size 2·ceil(3σ) + 1, reflect padding), applied
    as two separable passes of shifted adds (a 3-channel ``conv2d`` is several times slower on a CPU)."""
    if sigma <= 0:
        return image if image.dtype == torch.uint8 else image.to(torch.uint8)
    k = 2 * math.ceil(3 * sigma) + 1
    x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    w = (w / w.sum()).tolist()
    r = k // 2
    H, W = image.shape[-2:]
    y = F.pad(image.float()[None], [r, r, r, r], mode="reflect")[0]  # a float image (integer values) is used as is
    rows = y[:, :H] * w[0]
    for t in range(1, k):
        rows.add_(y[:, t:t + H], alpha=w[t])
    out = rows[:, :, :W] * w[0]
    for t in range(1, k):
        out.add_(rows[:, :, t:t + W], alpha=w[t])
    return out.round_().clamp_(0, 255).to(torch.uint8)


def aa_weights(in_size: int, out_size: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(first source index, weights ``(stop − start, taps)``) of output pixels ``[start, stop)`` of an
    antialiased bilinear resize ``in_size → out_size`` (the triangle filter stretched by the scale when
    shrinking, weights normalised per pixel: torch's ``antialias=True`` / Pillow's rule)."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    centre = scale * (np.arange(start, stop, dtype=np.float64) + 0.5)
    lo = np.maximum((centre - support + 0.5).astype(np.int64), 0)
    hi = np.minimum((centre + support + 0.5).astype(np.int64), in_size)
    taps = int((hi - lo).max()) if stop > start else 1
    j = np.arange(taps)
    w = np.clip(1.0 - np.abs((lo[:, None] + j - centre[:, None] + 0.5) * inv), 0.0, None)
    w[j[None, :] >= (hi - lo)[:, None]] = 0.0
    return lo, w / w.sum(1, keepdims=True)


def _resample_rows(x: torch.Tensor, in_size: int, out_size: int, start: int, stop: int, first: int = 0):
    """One separable pass along dim 1 of float ``x`` (3, rows, cols) holding source rows ``first …``: output rows
    ``[start, stop)``, rounded to integers as torch's uint8 kernel rounds after each pass."""
    if in_size == out_size:
        return x[:, start - first:stop - first]
    lo, w = aa_weights(in_size, out_size, start, stop)
    idx = torch.from_numpy(np.minimum(lo[:, None] + np.arange(w.shape[1]), in_size - 1) - first)
    wt = torch.from_numpy(w.astype(np.float32))
    y = x.index_select(1, idx[:, 0]).mul_(wt[None, :, 0, None])
    for t in range(1, w.shape[1]):
        y.addcmul_(x.index_select(1, idx[:, t]), wt[None, :, t, None])
    return y.add_(0.5).floor_().clamp_(0, 255)


def resample_region(image: torch.Tensor, out_hw: tuple[int, int], rows: tuple[int, int],
                    cols: tuple[int, int], *, as_float: bool = False) -> torch.Tensor:
    """Rows ``[r0, r1)`` × columns ``[c0, c1)`` of ``image`` (uint8 (3, H, W)) resized to ``out_hw`` (bilinear,
    antialiased), computing those pixels only: the width pass on the source rows they need, then the height
    pass. ``as_float``: the rounded values as float32 (spares a conversion when a blur follows)."""
    H, W = image.shape[-2:]
    (r0, r1), (c0, c1) = rows, cols
    if out_hw[0] != H:
        lo, w = aa_weights(H, out_hw[0], r0, r1)
        s0, s1 = int(lo.min()), int(min(H, lo.max() + w.shape[1]))
    else:
        s0, s1 = r0, r1
    x = image[:, s0:s1].float().transpose(1, 2).contiguous()  # (3, W, rows): the width pass along dim 1
    x = _resample_rows(x, W, out_hw[1], c0, c1).transpose(1, 2).contiguous()
    x = _resample_rows(x, H, out_hw[0], r0, r1, first=s0)
    return x if as_float else x.to(torch.uint8)


def nearest_index(in_size: int, out_size: int, start: int, stop: int) -> torch.Tensor:
    """Source index of output pixels ``[start, stop)`` of a nearest resize, in torch's float32 arithmetic
    (``floor(dst · in/out)``, clamped)."""
    if in_size == out_size:
        return torch.arange(start, stop)
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    idx = torch.floor(torch.arange(start, stop, dtype=torch.float32) * scale).long()
    return idx.clamp_(max=in_size - 1)


def _apply_region(params: AugmentParams, image: torch.Tensor, label: torch.Tensor):
    """Implementation 2 of ``apply``: flip, then resample only the crop's region of the scaled image, pad, blur."""
    if params.flip:
        image, label = image.flip(-1), label.flip(-1)
    H, W = image.shape[-2:]
    rh, rw = params.resized_h, params.resized_w
    r0, r1 = params.crop_top, min(params.crop_top + params.crop_h, rh)
    c0, c1 = params.crop_left, min(params.crop_left + params.crop_w, rw)
    blur = params.blur_sigma > 0
    img = torch.zeros(3, params.crop_h, params.crop_w, dtype=torch.float32 if blur else torch.uint8)
    lab = torch.full((params.crop_h, params.crop_w), 255, dtype=torch.uint8)
    if r1 > r0 and c1 > c0:
        img[:, :r1 - r0, :c1 - c0] = resample_region(image, (rh, rw), (r0, r1), (c0, c1), as_float=blur)
        lab[:r1 - r0, :c1 - c0] = label[nearest_index(H, rh, r0, r1)][:, nearest_index(W, rw, c0, c1)]
    return _blur(img, params.blur_sigma).contiguous(), lab


def val_transform(image: torch.Tensor, label: torch.Tensor, crop_size: tuple[int, int]):
    """Validation (reference): resize the short side to the crop's short side, centre-crop to
    ``crop_size`` (padding with 0 / 255 when the image is narrower)."""
    h, w = image.shape[-2:]
    short = min(crop_size)
    size = [short, max(1, round(w * short / h))] if h <= w else [max(1, round(h * short / w)), short]
    mask = tv_tensors.Mask(label.unsqueeze(0))
    image = TF.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    mask = TF.resize(mask, size, interpolation=InterpolationMode.NEAREST)
    ch, cw = crop_size
    pad_b, pad_r = max(ch - size[0], 0), max(cw - size[1], 0)
    if pad_b or pad_r:
        image = TF.pad(image, [0, 0, pad_r, pad_b], fill=0)
        mask = TF.pad(mask, [0, 0, pad_r, pad_b], fill=255)
    image = TF.center_crop(image, [ch, cw])
    mask = TF.center_crop(mask, [ch, cw])
    return image.contiguous(), mask.as_subclass(torch.Tensor)[0].contiguous()


def reference_size(h: int, w: int, short: int) -> tuple[int, int]:
    """(h, w) with the short side at ``short`` and the aspect kept, the long side truncated to an int:
    torchvision ``Resize(int)``'s rule, which the AttnFD / AICSD validation transform (``FixedResize``) uses."""
    if h <= w:
        return short, int(short * w / h)
    return int(short * h / w), short


def reference_image(image: torch.Tensor, short: int) -> torch.Tensor:
    """A uint8 image (3,H,W) with its short side resized to ``short`` as the AttnFD / AICSD released code
    does (``reference_size``, PIL bilinear)."""
    h, w = (int(v) for v in image.shape[-2:])
    nh, nw = reference_size(h, w, short)
    if (nh, nw) == (h, w):
        return image.contiguous()
    pil = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy().astype(np.uint8)))  # RGB
    return torch.from_numpy(np.asarray(pil.resize((nw, nh), Image.BILINEAR)).copy()).permute(2, 0, 1).contiguous()


def reference_resize(image: torch.Tensor, label: torch.Tensor, short: int):
    """Validation of the AttnFD / AICSD released code: the short side resized to ``short``, aspect kept
    (``reference_size``), image bilinear and label nearest with PIL, as its transform resizes PIL images
    (PIL's nearest samples pixel centres, floor((i + 0.5) · scale); torchvision's tensor nearest takes
    floor(i · scale) and picks other label pixels on a downscale)."""
    h, w = (int(v) for v in image.shape[-2:])
    nh, nw = reference_size(h, w, short)
    if (nh, nw) == (h, w):
        return image.contiguous(), label.contiguous()
    mask = Image.fromarray(np.ascontiguousarray(label.numpy().astype(np.uint8)))  # "L": values 0-255 kept
    lab = np.asarray(mask.resize((nw, nh), Image.NEAREST))
    return reference_image(image, short), torch.from_numpy(lab.copy())


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 (…,3,H,W) → float32 ImageNet-normalised."""
    x = image.float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def content_hash(t: torch.Tensor) -> str:
    """Hash of a uint8 tensor's shape and bytes: stored in the manifest, compared on replay."""
    t = t.contiguous().cpu()
    return blake2b_hex(str(tuple(t.shape)).encode() + t.numpy().tobytes())


SEED_ORDERS = ("cycle", "random")


def choose_aug_seed(run_seed: int, epoch: int, image_index: int, K: int, order: str = "cycle") -> int:
    """Which cached augmentation image ``image_index`` is shown with in ``epoch``: a pure function of
    (run seed, epoch, index), independent of rank count, worker count and batch order.

    ``cycle`` (default): without replacement — each block of K consecutive epochs shows every cached
    seed of the image exactly once, in an order shuffled per (run seed, block, image); a run of E ≤ K
    epochs sees E distinct crops, as with a fresh draw every epoch. ``random``: an independent uniform
    choice every epoch (with replacement; what runs without a recorded order followed): with E = K = 4 an
    image is shown only ~2.7 distinct crops, so fewer crops than the cache holds reach the student."""
    if order == "random":
        mixed = np.random.SeedSequence([run_seed, epoch, image_index]).generate_state(1, np.uint64)[0]
        return int(mixed % np.uint64(K))
    if order != "cycle":
        raise UserError(f"unknown seed order {order!r}: expected one of {SEED_ORDERS}")
    block, position = divmod(epoch, K)
    # the trailing 1 keeps these streams apart from the ``random`` order's [run_seed, epoch, index]
    rng = np.random.default_rng(np.random.SeedSequence([run_seed, block, image_index, 1]))
    return int(rng.permutation(K)[position])
