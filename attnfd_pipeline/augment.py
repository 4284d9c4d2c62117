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


def apply(params: AugmentParams, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``params`` to a uint8 image (3,H,W) and a uint8 label (H,W); returns uint8 tensors of
    the crop size. Pure: the output depends on the inputs only."""
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


def fixed_resize(image: torch.Tensor, label: torch.Tensor, size: tuple[int, int]):
    """Validation of the AttnFD / AICSD reference code (``FixedResize``): the whole image (bilinear,
    antialiased like PIL's) and its label (nearest) resized to ``size``, aspect ratio not kept."""
    mask = tv_tensors.Mask(label.unsqueeze(0))
    image = TF.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)
    mask = TF.resize(mask, list(size), interpolation=InterpolationMode.NEAREST)
    return image.contiguous(), mask.as_subclass(torch.Tensor)[0].contiguous()


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
