"""How a target is stored: its encoding (``float16`` or ``int8``) and optional average pooling.

Both are lossy steps done in this code before writing, so the store keeps spec codecs only and any Zarr v3
reader (tensorstore included) reads every array as plain numbers:

- ``float16``: one array ``<name>`` of float16 (optionally with the mantissa rounded: ``schema.to_float16``).
- ``int8``: per (sample, channel) affine quantisation. Three arrays: ``<name>`` holds uint8 codes,
  ``<name>.scale`` and ``<name>.offset`` hold float32 per (sample, channel); the value is
  ``offset + code * scale``. ``offset`` is the channel's minimum and ``scale = (max − min) / 255``, so every
  value is within ``scale / 2`` of the original (plus float32 rounding), the channel's minimum and maximum
  are kept, and in a post-ReLU channel that has a zero (minimum 0) the zeros decode to exactly 0. A channel
  whose range is zero stores ``scale = 0`` and decodes to its constant value exactly (never 0/0 = NaN).
  The offset array is kept for every target: it costs 4 bytes per channel per sample (< 0.1 % of the
  codes at the paper's crop), and a reader then needs no per-target rule.
- pooling (``cache.pool = {D = 2}``): the float32 map is average-pooled by the factor (window = stride =
  factor, a last partial window averaging only the pixels it covers: ``avg_pool2d(ceil_mode=True)``) before
  it is encoded. Stage 2 then compares at the stored resolution: the student's refined map is resized to
  the teacher's full-resolution map and pooled the same way (``pool_student``) — a variant of the loss.

The manifest checksum of a sample covers exactly what is stored: the bytes of its codes, then of its scales
and offsets (``sample_checksum``); for float16 it is the float16 bytes, as before these encodings existed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from attnfd_pipeline.errors import UserError

ENCODINGS = ("float16", "int8")
DEFAULT_ENCODING = "float16"
SCALE_SUFFIX = ".scale"
OFFSET_SUFFIX = ".offset"
LEVELS = 255  # uint8 codes 0..255

# zstd-1 compression of each storage variant's stored bytes (B+E+D together), measured by
# `attnfd bench-storage` (attnfd_pipeline/experiments/fidelity.py) on the finished demo teacher's maps at 257 px,
# the measured crop nearest the paper's; the plan uses them when it has no teacher outputs of its own
# (it says so). Keys: ``cache.plan.variant_name``.
MEASURED_COMPRESSION = {"float16": 1.86, "int8": 1.77, "float16+poolD2": 1.57, "int8+poolD2": 1.59}
# the compact storage the plan recommends, (encoding, pool): the smallest variant whose AttnFD loss
# gradient keeps cosine >= 0.999 against float32 targets (docs/storage.md). Pooled variants change the
# loss itself and fail that test by construction; they are shown beside it, not recommended.
RECOMMENDED = ("int8", ())


def stored_arrays(name: str, encoding: str) -> list[tuple[str, str]]:
    """(array name, dtype) of every Zarr array one target is stored in."""
    if encoding == "float16":
        return [(name, "float16")]
    if encoding == "int8":
        return [(name, "uint8"), (name + SCALE_SUFFIX, "float32"), (name + OFFSET_SUFFIX, "float32")]
    raise UserError(f"unknown cache encoding {encoding!r} (known: {', '.join(ENCODINGS)})")


def bytes_per_sample(chw: Sequence[int], encoding: str) -> int:
    """Uncompressed stored bytes of one sample of a (C, H, W) target."""
    C, H, W = (int(v) for v in chw)
    if encoding == "float16":
        return C * H * W * 2
    if encoding == "int8":
        return C * H * W + 2 * 4 * C
    raise UserError(f"unknown cache encoding {encoding!r} (known: {', '.join(ENCODINGS)})")


def sample_checksum(*parts: np.ndarray) -> str:
    """Checksum of one stored sample: its arrays' bytes (C order) in ``stored_arrays`` order."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(np.ascontiguousarray(p).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# int8: per (sample, channel) affine quantisation


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 ``(n, C, H, W)`` (finite) → uint8 codes ``(n, C, H, W)``, float32 scale and offset ``(n, C)``."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    n, C = t.shape[:2]
    flat = t.reshape(n, C, -1)
    if flat.shape[-1] == 0:
        zeros = np.zeros((n, C), np.float32)
        return np.zeros(t.shape, np.uint8), zeros, zeros.copy()
    lo, hi = flat.amin(-1), flat.amax(-1)
    # the range in float64: hi − lo of two large float32 values of opposite sign can overflow float32
    scale = ((hi.double() - lo.double()) / LEVELS).float()
    # a range of 0 (constant channel) or one whose step underflows float32 stores scale 0: the channel
    # decodes to its minimum, exact for a constant channel and within the range otherwise
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = ((flat - lo[..., None]) / safe[..., None]).round_().clamp_(0, LEVELS)
    codes = torch.where((scale > 0)[..., None], codes, torch.zeros_like(codes))
    return codes.to(torch.uint8).reshape(t.shape).numpy(), scale.numpy(), lo.numpy()


def dequantize_int8(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """uint8 codes ``(..., C, H, W)`` with scale/offset ``(..., C)`` → float32 ``offset + code · scale``."""
    def tensor(a, dtype=None):  # read-only buffers (a decoded frame) are copied: torch needs writable memory
        return torch.from_numpy(np.require(a, dtype=dtype, requirements=["C", "W"]))

    c = tensor(codes)
    s = tensor(scale, np.float32)[..., None, None]
    o = tensor(offset, np.float32)[..., None, None]
    return torch.addcmul(o, c.float(), s).numpy()


def decode(encoding: str, parts: Sequence[np.ndarray]) -> np.ndarray:
    """Stored arrays of one target (``stored_arrays`` order) → its values (float16 as stored; int8 →
    float32)."""
    if encoding == "float16":
        return parts[0]
    if encoding == "int8":
        return dequantize_int8(*parts)
    raise UserError(f"unknown cache encoding {encoding!r} (known: {', '.join(ENCODINGS)})")


# ---------------------------------------------------------------------------------------------
# pooling


def pooled_hw(h: int, w: int, factor: int) -> tuple[int, int]:
    return math.ceil(h / factor), math.ceil(w / factor)


def pool_maps(x: np.ndarray, factor: int) -> np.ndarray:
    """float32 ``(n, C, H, W)`` → average-pooled ``(n, C, ceil(H/f), ceil(W/f))``."""
    if factor <= 1:
        return x
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return F.avg_pool2d(t, factor, factor, ceil_mode=True).numpy()


def pool_student(x: torch.Tensor, full_hw: Sequence[int], factor: int) -> torch.Tensor:
    """The student's refined map brought to a pooled target: bilinear resize to the teacher's full map
    (as the unpooled loss does), then the same average pooling the cache applied."""
    if tuple(x.shape[-2:]) != tuple(full_hw):
        x = F.interpolate(x, size=tuple(full_hw), mode="bilinear", align_corners=False)
    return F.avg_pool2d(x, factor, factor, ceil_mode=True) if factor > 1 else x


def pool_of(pool: Mapping[str, int] | Sequence[tuple[str, int]], name: str) -> int:
    """Pooling factor of target ``name`` (1 = none). Pooling applies to the refined points only."""
    return int(dict(pool).get(name, 1))


def target_pools(info) -> dict[str, tuple[int, int, int]]:
    """``{target: (factor, full_H, full_W)}`` for the pooled targets of a cache (its ``CacheInfo``; empty for
    caches without pooling, which includes every cache written before pooling existed)."""
    return dict(info.pools)
