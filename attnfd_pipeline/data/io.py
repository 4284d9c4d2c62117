"""Reading and writing images and label maps.

* ``read_image``  -> uint8 (3, H, W) RGB tensor (torchvision decoder, Pillow fallback).
* ``read_label``  -> uint8 (H, W) tensor of train ids (palette/grayscale PNG indices mapped
  through the dataset's table).
* ``write_palette_png`` / ``write_jpeg`` write atomically (``utils.atomic_write_bytes``: temp file + fsync + rename).
* ``load_pair``   -> (image, label) of one sample of a :class:`SplitFiles`, sizes checked.

torch/torchvision are imported on first use so that processes that only write files (the demo
generator's workers) start quickly.
"""

from __future__ import annotations

import io as _io
import os
import warnings
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np
from PIL import Image

from ..utils import atomic_write_bytes
from .datasets import DataError, DatasetInfo, SplitFiles, get_dataset_info, voc_colormap
from attnfd_pipeline.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "read_image",
    "read_label",
    "read_label_raw",
    "write_palette_png",
    "write_jpeg",
    "load_pair",
    "atomic_write_bytes",
]

PathLike = Union[str, os.PathLike]

_LABEL_MODES = ("P", "L")
_INT_MODES = ("I;16", "I;16L", "I;16B", "I")
# torchvision >= 0.29 flags its image codecs as deprecated (in favour of TorchCodec). We use
# them where they work (about 2.5x faster than Pillow for JPEG) and keep a Pillow fallback.
_TV_DEPRECATION_RX = r"The image decoding and encoding capabilities of TorchVision are deprecated"
_tv_state: dict = {}


def _tv_decoder():
    """(decode_image, RGB mode) or None when torchvision's image codecs are unavailable."""
    if "decode" not in _tv_state:
        try:
            from torchvision.io import ImageReadMode, decode_image

            _tv_state["decode"] = (decode_image, ImageReadMode.RGB)
        except Exception:  # noqa: BLE001 - any import problem means "use Pillow"
            _tv_state["decode"] = None
    dec = _tv_state["decode"]
    if dec is not None:
        for f in warnings.filters:  # add our narrow filter once (and again if a test reset them)
            if f[0] == "ignore" and f[1] is not None and f[1].pattern == _TV_DEPRECATION_RX:
                break
        else:
            warnings.filterwarnings("ignore", message=_TV_DEPRECATION_RX, category=DeprecationWarning)
    return dec


def read_image(path: PathLike) -> "torch.Tensor":
    """uint8 (3, H, W) RGB. Grayscale, palette and RGBA images are converted to RGB.
    A missing, unreadable or corrupt (also truncated) file raises DataError naming it."""
    import torch

    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(p, f"image file not found: {p}") from None
    except OSError as e:
        raise DataError(p, f"cannot read image {p}: {e.strerror or e}") from e
    if not data:
        raise DataError(p, f"image file is empty: {p}")
    dec = _tv_decoder()
    if dec is not None:
        decode_image, rgb = dec
        try:
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=rgb)
            if img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3:
                return img
        except Exception:  # noqa: BLE001 - fall back to Pillow, which gives the final verdict
            pass
    try:
        with Image.open(_io.BytesIO(data)) as im:
            im.load()
            if im.mode in _INT_MODES or im.mode == "F":
                arr = np.asarray(im)
                if arr.max(initial=0) > 255:
                    arr = arr / max(float(arr.max()), 1.0) * 255.0
                rgb_im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).convert("RGB")
            else:
                rgb_im = im.convert("RGB")
            arr = np.array(rgb_im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(p, f"cannot decode image {p}: {e}") from e
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def read_label_raw(path: PathLike) -> np.ndarray:
    """The stored values of a label PNG as uint8 (H, W), without any mapping.

    Palette ("P") images give their indices, grayscale ("L") their values; 16-bit grayscale is
    accepted when all values fit in 0..255. Colour-encoded labels are rejected."""
    p = os.fspath(path)
    try:
        with Image.open(p) as im:
            mode = im.mode
            if mode in _LABEL_MODES:
                arr = np.array(im, dtype=np.uint8)
            elif mode in _INT_MODES:
                wide = np.asarray(im)
                if wide.size and (wide.min() < 0 or wide.max() > 255):
                    raise DataError(
                        p, f"label {p} is a {mode} image with values up to {int(wide.max())}: expected class indices 0..255"
                    )
                arr = wide.astype(np.uint8)
            else:
                raise DataError(
                    p,
                    f"label {p} has image mode {mode!r}: expected a palette ('P') or grayscale ('L') PNG of class "
                    f"indices (colour-encoded labels must be converted to indices first)",
                )
    except FileNotFoundError:
        raise DataError(p, f"label file not found: {p}") from None
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(p, f"cannot decode label {p}: {e}") from e
    if arr.ndim != 2:
        raise DataError(p, f"label {p} has shape {arr.shape}: expected a single-channel image")
    return arr


def read_label(path: PathLike, info: Union[str, DatasetInfo]) -> "torch.Tensor":
    """uint8 (H, W) train ids: the stored indices mapped through the dataset's label table
    (``info.lut_for(path)``; ``*_labelTrainIds.png`` style files use the identity)."""
    import torch

    info = get_dataset_info(info)
    raw = read_label_raw(path)
    if info.raw_to_train is None or info.is_train_id_file(path):
        out = raw  # identity table: skip the gather
        legal = info.valid_stored_values(path)  # [0, C) ∪ {ignore}: anything else would crash (or corrupt) the loss
        if not legal[out].all():
            bad = np.flatnonzero(np.bincount(out.ravel(), minlength=256) * ~legal)
            shown = ", ".join(str(int(v)) for v in bad[:12])
            raise DataError(os.fspath(path), f"label {os.fspath(path)} has values {{{shown}}} outside the "
                                             f"{info.num_classes} classes of {info.name} and {info.ignore_index} (ignore)")
    else:
        out = info.lut_for(path)[raw]
    return torch.from_numpy(np.ascontiguousarray(out))


def load_pair(info: Union[str, DatasetInfo], files: SplitFiles, index: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(image uint8 (3, H, W), label uint8 (H, W)) of sample ``index``; DataError naming both
    files when their sizes differ."""
    info = get_dataset_info(info)
    img_path = str(files.images[index])
    lbl_path = str(files.labels[index])
    image = read_image(img_path)
    label = read_label(lbl_path, info)
    if tuple(image.shape[1:]) != tuple(label.shape):
        ih, iw = image.shape[1:]
        lh, lw = label.shape
        raise DataError(
            lbl_path,
            f"size mismatch: image {img_path} is {iw}x{ih} but label {lbl_path} is {lw}x{lh} (width x height)",
        )
    return image, label


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _full_palette(palette: Sequence[Sequence[int]]) -> bytes:
    """256-entry palette: the given colours, then the VOC colormap (so index 255 gets the
    VOC ignore colour (224, 224, 192))."""
    full = [tuple(c) for c in voc_colormap(256)]
    for i, c in enumerate(palette):
        if i >= 256:
            break
        full[i] = tuple(int(v) for v in c)
    return bytes(v for c in full for v in c)


def write_palette_png(path: PathLike, label_hw_uint8, palette: Sequence[Sequence[int]]) -> None:
    """Write a palette ("P") PNG whose indices are the label values."""
    arr = _to_numpy(label_hw_uint8)
    if arr.ndim != 2:
        raise UserError(f"label must be (H, W), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise UserError("label values must be in 0..255")
        arr = arr.astype(np.uint8)
    arr = np.ascontiguousarray(arr)
    h, w = arr.shape
    im = Image.frombytes("P", (w, h), arr.tobytes())
    im.putpalette(_full_palette(palette))
    buf = _io.BytesIO()
    im.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def write_jpeg(path: PathLike, image_chw_uint8, quality: int = 95) -> None:
    """Write a (3, H, W) uint8 RGB image as a baseline JPEG (Pillow, deterministic bytes)."""
    arr = _to_numpy(image_chw_uint8)
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise UserError(f"image must be (3, H, W), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise UserError(f"image must be uint8, got {arr.dtype}")
    hwc = np.ascontiguousarray(arr.transpose(1, 2, 0))
    buf = _io.BytesIO()
    Image.fromarray(hwc).save(buf, format="JPEG", quality=int(quality))
    atomic_write_bytes(path, buf.getvalue())

