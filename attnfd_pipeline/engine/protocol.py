"""Evaluation protocols: what a validation image looks like when it is scored, and how the model's logits
cover it (docs/inference.md).

* ``reference``: the whole image and its label with the short side resized to the crop's, aspect ratio kept
  (a 120×90 image at crop 513 is scored at 513×684), one image per batch — the AttnFD / AICSD released
  validation transform (``FixedResize``, a torchvision ``Resize(int)`` on PIL images); their published
  numbers use it.
* ``whole``: the original resolution; an image larger than the window is covered by overlapping windows
  whose logits are averaged (mmsegmentation's ``slide`` mode, used by CIRKD and Af-DCD).
* ``center_crop``: the short side resized to the crop's, then a centre crop (what this project scored
  before protocols were a setting; a wide image loses its sides).

Scores are one confusion matrix over the split in every protocol; only the pixels scored differ, so
numbers under different protocols are not comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from attnfd_pipeline import augment
from attnfd_pipeline.config import EVAL_PROTOCOLS, Config, ConfigError

Predict = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EvalProtocol:
    name: str  # one of config.EVAL_PROTOCOLS
    crop: tuple[int, int]  # (h, w): "center_crop" cuts it; "reference" resizes the short side to min(crop)
    window: tuple[int, int]  # (h, w) of a sliding window ("whole")
    stride: tuple[int, int]  # (h, w) step between windows ("whole")

    def __post_init__(self):
        if self.name not in EVAL_PROTOCOLS:
            raise ConfigError(f"eval.protocol: {self.name!r} is not one of {', '.join(EVAL_PROTOCOLS)}")
        if any(s > w for s, w in zip(self.stride, self.window)):
            raise ConfigError(f"eval.stride: {list(self.stride)} is larger than the window {list(self.window)}: "
                              f"pixels between windows would never be scored")

    @classmethod
    def from_config(cls, cfg: Config) -> "EvalProtocol":
        e, crop = cfg.eval, tuple(cfg.augment.crop_size)
        window = tuple(e.window) if min(e.window) > 0 else crop
        # two thirds of the window: mmsegmentation's Cityscapes setting (512×1024 window, 341×683 stride)
        stride = tuple(e.stride) if min(e.stride) > 0 else tuple(max(1, round(w * 2 / 3)) for w in window)
        return cls(e.protocol, crop, window, stride)

    def describe(self) -> dict:
        """What every result records about how it was scored."""
        h, w = self.crop
        text = {
            "reference": f"short side of image and label resized to {min(self.crop)} (aspect kept, PIL bilinear / "
                         f"nearest), the whole image scored",
            "whole": f"original resolution; sliding {self.window[0]}x{self.window[1]} windows with stride "
                     f"{self.stride[0]}x{self.stride[1]} when larger",
            "center_crop": f"short side resized to {min(self.crop)}, centre {h}x{w} crop scored",
        }[self.name]
        out = {"name": self.name, "crop": list(self.crop), "text": text}
        if self.name == "whole":
            out.update(window=list(self.window), stride=list(self.stride))
        return out

    # -- the scored image --------------------------------------------------------------------------------
    def transform(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A val image (uint8 (3,H,W)) and its label (uint8 (H,W)) as this protocol scores them."""
        if self.name == "center_crop":
            return augment.val_transform(image, label, self.crop)
        if self.name == "reference":
            return augment.reference_resize(image, label, min(self.crop))
        return image, label

    def val_batch_size(self, requested: int) -> int:
        """Images keep their own sizes (``whole``) or aspect ratios (``reference``): one image per batch."""
        return 1 if self.name in ("whole", "reference") else requested

    def logits(self, predict: Predict, images: torch.Tensor) -> torch.Tensor:
        """Logits at the size of ``images`` (normalised, already transformed)."""
        if self.name == "whole":
            return sliding_window_logits(predict, images, self.window, self.stride)
        return predict(images)

    # -- any image at its own size (prediction) ----------------------------------------------------------
    def model_input(self, image: torch.Tensor) -> torch.Tensor:
        """A uint8 image (3,H,W) at the scale this protocol shows the model, without cropping: short side
        resized to the crop's as the released code does (``reference``: PIL, long side truncated) or with
        torchvision (``center_crop``), as is (``whole``)."""
        h, w = image.shape[-2:]
        if self.name == "reference":
            return augment.reference_image(image, min(self.crop))
        if self.name == "center_crop":
            short = min(self.crop)
            size = [short, max(1, round(w * short / h))] if h <= w else [max(1, round(h * short / w)), short]
        else:
            return image
        return TF.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)

    def input_logits(self, predict: Predict, images: torch.Tensor) -> torch.Tensor:
        """Logits of a normalised batch of ``model_input`` images: windows of ``window`` cover any image
        larger than it, as the model never saw inputs much larger than its crops."""
        return sliding_window_logits(predict, images, self.window, self.stride)

    @staticmethod
    def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits brought back to an image's original ``size`` (bilinear)."""
        if tuple(logits.shape[-2:]) == tuple(size):
            return logits
        return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)

def sliding_window_logits(predict: Predict, images: torch.Tensor, window: tuple[int, int],
                          stride: tuple[int, int]) -> torch.Tensor:
    """Logits of (N,3,H,W) ``images`` from ``window``-sized crops every ``stride`` pixels, averaged where
    they overlap; the last row/column of windows is shifted back to end at the border (mmsegmentation's
    ``slide_inference``). An image no larger than the window is predicted whole."""
    _, _, h, w = images.shape
    (wh, ww), (sh, sw) = window, stride
    if h <= wh and w <= ww:
        return predict(images)
    rows = max(h - wh + sh - 1, 0) // sh + 1
    cols = max(w - ww + sw - 1, 0) // sw + 1
    out, count = None, images.new_zeros(1, 1, h, w)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + wh, h), min(c * sw + ww, w)
            y1, x1 = max(y2 - wh, 0), max(x2 - ww, 0)
            logits = predict(images[..., y1:y2, x1:x2]).float()
            if out is None:
                out = images.new_zeros(images.shape[0], logits.shape[1], h, w, dtype=torch.float32)
            out[..., y1:y2, x1:x2] += logits
            count[..., y1:y2, x1:x2] += 1
    return out / count
