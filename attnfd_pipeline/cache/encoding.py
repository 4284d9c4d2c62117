"""How a target is stored, in one place: its encoding (``float16`` or ``int8``), optional average pooling, the
per-sample checksum, and the moves between the teacher's float32 and the stored arrays (docs/cache-format.md).

Public API (torch tensors on any device; NumPy arrays are accepted and given back as NumPy):

- ``encode(x, encoding, mantissa_bits=, pool=, target=, ids=, seeds=)``: float32 ``(n, C, H, W)`` → the stored
  arrays (``stored_arrays`` order) on ``x``'s device: pooling, the float16 cast with its checks or the int8
  quantisation are torch ops, so the build runs them on the teacher's device and only stored bytes cross.
- ``to_host(parts)``: device tensors → host tensors (pinned memory, non-blocking copies on a side stream on
  CUDA; ``HostCopies.wait`` before reading them).
- ``decode(encoding, parts)``: stored arrays → values (float16 as stored; int8 → float32) on their device.
- ``batch_item(encoding, parts)`` / ``decode_item(item)``: the form a target travels in through a DataLoader
  (a float16 tensor, or ``{"codes", "scale", "offset"}``) and its decoding on the student's device.
- ``checksum(parts, algorithm)``: the manifest checksum of one stored sample (``CHECKSUM`` for new caches,
  ``LEGACY_CHECKSUM`` for attnfd-cache/1 ones).
- ``stored_arrays(name, encoding)``, ``bytes_per_sample(chw, encoding)``: the stored layout and its size.

The encodings:

- ``float16``: one array ``<name>`` of float16 (optionally with the mantissa rounded: ``round_mantissa``),
  refused when non-finite or beyond ±65504.
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
and offsets; for float16 the float16 bytes. ``crc32c`` (hardware-accelerated by ``google-crc32c``, which
zarr already depends on: ~15 GB/s on one core against blake2b's ~0.6–0.8) keeps the per-read check under
a millisecond at the paper's shapes; ``attnfd cache verify`` checks every sample with the same algorithm.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from attnfd_pipeline.errors import UserError

from attnfd_pipeline.cache.errors import CacheError

ENCODINGS = ("float16", "int8")
DEFAULT_ENCODING = "float16"
SCALE_SUFFIX = ".scale"
OFFSET_SUFFIX = ".offset"
LEVELS = 255  # uint8 codes 0..255
FLOAT16_MAX = 65504.0
# per-sample manifest checksums: the algorithm new caches record in cache.json, and the one attnfd-cache/1
# caches were written with (they record none: ``info.CACHE_JSON``)
CHECKSUMS = ("crc32c", "blake2b")
CHECKSUM = "crc32c"
LEGACY_CHECKSUM = "blake2b"
# the int8 roles of a target's stored arrays, in ``stored_arrays`` order (the keys of a ``batch_item``)
INT8_ROLES = ("codes", "scale", "offset")

# zstd-1 compression of each storage variant's stored bytes (B+E+D together), measured by
# `attnfd bench-storage` (attnfd_pipeline/experiments/fidelity.py) on the finished demo teacher's maps at 257 px,
# the measured crop nearest the paper's; the plan uses them when it has no teacher outputs of its own
# (it says so). Keys: ``cache.plan.variant_name``.
MEASURED_COMPRESSION = {"float16": 1.86, "int8": 1.77, "float16+poolD2": 1.57, "int8+poolD2": 1.59}
# the compact storage the plan recommends, (encoding, pool): the smallest variant whose AttnFD loss
# gradient keeps cosine >= 0.999 against float32 targets (docs/storage.md). Pooled variants change the
# loss itself and fail that test by construction; they are shown beside it, not recommended.
RECOMMENDED = ("int8", ())


def _unknown(encoding: str) -> UserError:
    return UserError(f"unknown cache encoding {encoding!r} (known: {', '.join(ENCODINGS)})")


def stored_arrays(name: str, encoding: str) -> list[tuple[str, str]]:
    """(array name, dtype) of every Zarr array one target is stored in."""
    if encoding == "float16":
        return [(name, "float16")]
    if encoding == "int8":
        return [(name, "uint8"), (name + SCALE_SUFFIX, "float32"), (name + OFFSET_SUFFIX, "float32")]
    raise _unknown(encoding)


def bytes_per_sample(chw: Sequence[int], encoding: str) -> int:
    """Uncompressed stored bytes of one sample of a (C, H, W) target."""
    C, H, W = (int(v) for v in chw)
    if encoding == "float16":
        return C * H * W * 2
    if encoding == "int8":
        return C * H * W + 2 * 4 * C
    raise _unknown(encoding)


# ---------------------------------------------------------------------------------------------
# checksum


def _as_bytes(p) -> np.ndarray:
    """A stored array's bytes (C order) as a flat uint8 view, without a copy when already contiguous."""
    a = p.detach().cpu().numpy() if isinstance(p, torch.Tensor) else np.asarray(p)
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def checksum(parts: Sequence, algorithm: str = CHECKSUM) -> str:
    """Checksum (hex) of one stored sample: the bytes of its arrays (C order) in ``stored_arrays`` order.
    ``crc32c``: 8 hex digits; ``blake2b`` (caches that record no algorithm): 32 hex digits."""
    if algorithm == "crc32c":
        import google_crc32c

        crc = 0
        for p in parts:
            crc = google_crc32c.extend(crc, _as_bytes(p))
        return f"{crc:08x}"
    if algorithm == "blake2b":
        h = hashlib.blake2b(digest_size=16)
        for p in parts:
            h.update(_as_bytes(p))
        return h.hexdigest()
    raise CacheError(f"unknown checksum algorithm {algorithm!r} (known: {', '.join(CHECKSUMS)})")


# ---------------------------------------------------------------------------------------------
# float16: the cast with its checks (+ optional mantissa rounding)


def effective_mantissa_bits(mantissa_bits: int) -> int:
    """float16 keeps 10 mantissa bits; config 0 means 'keep them all'."""
    return 10 if mantissa_bits in (0, 10) else int(mantissa_bits)


def lossy_steps(mantissa_bits: int, encoding: str = "float16", pool: int = 1) -> list[str]:
    """The lossy steps from the teacher's float32 to what is stored, in words (cache.json, array attributes)."""
    steps = []
    if pool > 1:
        steps.append(f"average-pooled by {pool} (window = stride = {pool}, a last partial window averages the "
                     f"pixels it covers), in float32")
    if encoding == "int8":
        return steps + ["per (sample, channel) affine quantisation to uint8 codes: value = offset + code * scale, "
                        "offset = channel min, scale = (max - min) / 255 (0 for a constant channel); "
                        "|error| <= scale / 2"]
    steps += ["cast float32 -> float16 (round to nearest even); refused if non-finite or |x| > 65504"]
    m = effective_mantissa_bits(mantissa_bits)
    if m < 10:
        steps.append(f"float16 mantissa rounded to {m} bits (round to nearest even on the bit pattern)")
    return steps


def round_mantissa(x16, bits: int):
    """Round float16 values to ``bits`` mantissa bits (round to nearest, ties to even) on the bit pattern;
    the carry may move into the exponent (correct rounding up to the next binade). NumPy or torch."""
    bits = effective_mantissa_bits(bits)
    if bits >= 10:
        return x16
    drop = 10 - bits
    if isinstance(x16, torch.Tensor):  # int32 arithmetic on the 16-bit pattern (torch has no uint16 ops)
        u = x16.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
        sign, mag = u & 0x8000, u & 0x7FFF
        lsb = (mag >> drop) & 1
        mag = (mag + ((1 << (drop - 1)) - 1) + lsb) & ~((1 << drop) - 1)
        out = sign | mag
        return torch.where(out >= 0x8000, out - 0x10000, out).to(torch.int16).view(torch.float16)
    u = np.ascontiguousarray(x16).view(np.uint16)
    sign = u & np.uint16(0x8000)
    mag = (u & np.uint16(0x7FFF)).astype(np.uint32)
    lsb = (mag >> drop) & 1
    mag = (mag + ((1 << (drop - 1)) - 1) + lsb) & ~np.uint32((1 << drop) - 1)
    return (sign | mag.astype(np.uint16)).view(np.float16)


def _where(ids: Sequence[str], seeds: Sequence[int], flat_bad: np.ndarray, per_sample: int) -> str:
    first = int(np.flatnonzero(flat_bad)[0]) // per_sample
    return f"image {ids[first]!r}, aug seed {seeds[first]}"


def _samples(ids, seeds, bad_rows: np.ndarray) -> str:
    return ", ".join(f"{ids[r]!r}/seed {seeds[r]}" for r in bad_rows[:5])


def _refuse(x: np.ndarray, target: str, ids: Sequence[str], seeds: Sequence[int], *, overflow: bool) -> None:
    """Raise the CacheError naming the non-finite (or, with ``overflow``, beyond-float16) teacher values of
    ``x`` (host float32 ``(n, …)``): the slow path, taken only once the quick device check has failed."""
    n = x.shape[0]
    flat = x.reshape(n, -1)
    per = flat.shape[1] or 1
    bad = ~np.isfinite(flat)
    if bad.any():
        raise CacheError(f"target {target!r}: {int(bad.sum())} non-finite teacher values (first at "
                         f"{_where(ids, seeds, bad.ravel(), per)}; samples "
                         f"{_samples(ids, seeds, np.flatnonzero(bad.any(axis=1)))}); refusing to write them")
    big = np.abs(flat) > FLOAT16_MAX
    if overflow and big.any():
        raise CacheError(f"target {target!r}: {int(big.sum())} values overflow float16 (max |x| = "
                         f"{float(np.abs(flat).max()):.4g} > 65504, first at {_where(ids, seeds, big.ravel(), per)}; "
                         f"samples {_samples(ids, seeds, np.flatnonzero(big.any(axis=1)))}); refusing to write them")


def _float16(x: torch.Tensor, mantissa_bits: int, target: str, ids, seeds) -> torch.Tensor:
    """float32 → float16 on ``x``'s device; one reduction (min/max propagate NaN) and one sync decide
    whether the values can be cast; the detailed refusal runs on the host."""
    if x.numel():
        lo, hi = torch.aminmax(x.reshape(-1))
        if not bool((lo >= -FLOAT16_MAX) & (hi <= FLOAT16_MAX)):
            _refuse(x.cpu().numpy(), target, ids, seeds, overflow=True)
    # torch's float32 → float16 cast is IEEE round-to-nearest-even like NumPy's (bitwise equal, tested)
    y = x.to(torch.float16)
    if effective_mantissa_bits(mantissa_bits) < 10:
        y = round_mantissa(y, mantissa_bits)
        if y.numel() and not bool(torch.isfinite(y).all()):
            yn = y.cpu().numpy()
            inf = ~np.isfinite(yn.reshape(yn.shape[0], -1))
            raise CacheError(f"target {target!r}: values round to inf with mantissa_bits={mantissa_bits} (at "
                             f"{_where(ids, seeds, inf.ravel(), inf.shape[1])}); refusing to write them")
    return y


# ---------------------------------------------------------------------------------------------
# int8: per (sample, channel) affine quantisation


def _int8(x: torch.Tensor) -> list[torch.Tensor]:
    """float32 ``(n, C, H, W)`` (finite) → uint8 codes, float32 scale and offset ``(n, C)``, on x's device.

    Every step is an IEEE-rounded float32 operation or an exact reduction, in the same order on every
    device: the codes are bitwise those of the CPU (docs/cache-format.md "Encoding on the device")."""
    n, C = x.shape[:2]
    flat = x.reshape(n, C, -1)
    if flat.shape[-1] == 0:
        zeros = torch.zeros((n, C), dtype=torch.float32, device=x.device)
        return [torch.zeros(x.shape, dtype=torch.uint8, device=x.device), zeros, zeros.clone()]
    lo, hi = torch.aminmax(flat, dim=-1)
    # the range in float64: hi − lo of two large float32 values of opposite sign can overflow float32
    scale = ((hi.double() - lo.double()) / LEVELS).float()
    # a range of 0 (constant channel) or one whose step underflows float32 stores scale 0: the channel
    # decodes to its minimum, exact for a constant channel and within the range otherwise
    live = scale > 0
    safe = torch.where(live, scale, torch.ones_like(scale))
    codes = (flat - lo[..., None]).div_(safe[..., None]).round_().clamp_(0, LEVELS)
    codes.masked_fill_(~live[..., None], 0)
    return [codes.to(torch.uint8).reshape(x.shape), scale, lo]


def _check_finite_int8(x: torch.Tensor, target: str, ids, seeds) -> None:
    if x.numel():
        lo, hi = torch.aminmax(x.reshape(-1))
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            _refuse(x.cpu().numpy(), target, ids, seeds, overflow=False)


# ---------------------------------------------------------------------------------------------
# encode / decode


def encode(x, encoding: str, *, mantissa_bits: int = 0, pool: int = 1, target: str = "?",
           ids: Sequence[str] = (), seeds: Sequence[int] = ()) -> list:
    """float32 samples ``(n, C, H, W)`` → the arrays stored for them (``stored_arrays`` order), on ``x``'s
    device (a NumPy ``x`` gives NumPy arrays): pooled first if asked, then float16 (refusing non-finite
    values and overflow) or int8 codes, scales and offsets (refusing non-finite values). ``ids``/``seeds``
    name the ``n`` samples in error messages."""
    if encoding not in ENCODINGS:
        raise _unknown(encoding)
    host = not isinstance(x, torch.Tensor)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) if host else x.float()
    n = t.shape[0]
    ids = list(ids) or [str(i) for i in range(n)]
    seeds = list(seeds) or [0] * n
    t = pool_maps(t, pool)
    if encoding == "float16":
        parts = [_float16(t, mantissa_bits, target, ids, seeds)]
    else:
        _check_finite_int8(t, target, ids, seeds)
        parts = _int8(t)
    return [p.numpy() for p in parts] if host else parts


def encode_target(x: np.ndarray, encoding: str, mantissa_bits: int, pool: int, *, target: str,
                  ids: Sequence[str], seeds: Sequence[int]) -> list[np.ndarray]:
    """``encode`` on the host: float32 NumPy ``(n, C, H, W)`` → NumPy stored arrays."""
    return encode(np.asarray(x), encoding, mantissa_bits=mantissa_bits, pool=pool, target=target, ids=ids,
                  seeds=seeds)


def to_float16(x: np.ndarray, mantissa_bits: int, *, target: str, ids: Sequence[str],
               seeds: Sequence[int]) -> np.ndarray:
    """float32 samples ``(n, C, H, W)`` → float16, refusing non-finite values and float16 overflow."""
    return encode(np.asarray(x), "float16", mantissa_bits=mantissa_bits, target=target, ids=ids, seeds=seeds)[0]


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 ``(n, C, H, W)`` (finite) → uint8 codes ``(n, C, H, W)``, float32 scale and offset ``(n, C)``."""
    codes, scale, offset = _int8(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    return codes.numpy(), scale.numpy(), offset.numpy()


def _writable(a, dtype=None) -> torch.Tensor:
    """A tensor over ``a``; read-only buffers (a decoded frame) are copied: torch needs writable memory."""
    if isinstance(a, torch.Tensor):
        return a if dtype is None else a.to(dtype)
    return torch.from_numpy(np.require(a, dtype=dtype, requirements=["C", "W"]))


def dequantize_int8(codes, scale, offset):
    """uint8 codes ``(..., C, H, W)`` with scale/offset ``(..., C)`` → float32 ``offset + code · scale``
    (on the codes' device; NumPy in, NumPy out)."""
    host = not isinstance(codes, torch.Tensor)
    c = _writable(codes)
    s = _writable(scale, np.float32 if host else torch.float32)[..., None, None]
    o = _writable(offset, np.float32 if host else torch.float32)[..., None, None]
    out = torch.addcmul(o, c.float(), s)
    return out.numpy() if host else out


def decode(encoding: str, parts: Sequence):
    """Stored arrays of one target (``stored_arrays`` order) → its values (float16 as stored; int8 →
    float32), on their device (NumPy in, NumPy out)."""
    if encoding == "float16":
        return parts[0]
    if encoding == "int8":
        return dequantize_int8(*parts)
    raise _unknown(encoding)


def batch_item(encoding: str, parts: Sequence):
    """The form one target of one sample travels in from a DataLoader worker to the student's device:
    exactly the stored arrays (a float16 tensor, or ``{"codes", "scale", "offset"}``), never decoded;
    ``default_collate`` stacks either into a batch."""
    ts = [_writable(p) for p in parts]
    if encoding == "float16":
        return ts[0]
    if encoding == "int8":
        return dict(zip(INT8_ROLES, ts))
    raise _unknown(encoding)


def decode_item(item):
    """A (batched) ``batch_item`` → its values on its device: float16 as stored, int8 dequantised to float32
    (``offset + code · scale``: one fused multiply-add per element, on the student's device)."""
    if isinstance(item, Mapping):
        return dequantize_int8(*(item[r] for r in INT8_ROLES))
    return item


def item_nbytes(item) -> int:
    """Bytes of a ``batch_item`` (what crosses shared memory and the host-to-device copy)."""
    if isinstance(item, Mapping):
        return sum(int(v.numel() * v.element_size()) for v in item.values())
    return int(item.numel() * item.element_size())


# ---------------------------------------------------------------------------------------------
# device → host


class HostCopies:
    """Device tensors copied to the host as they are produced: on CUDA into pinned buffers with non-blocking
    copies on a side stream, so the next batch's forward overlaps them; elsewhere the tensors themselves
    (already on the host) or a plain copy. ``wait()`` before reading what ``add`` returned."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def add(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu":
            return t
        if self.stream is None:
            return t.cpu()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(self.stream)  # the caching allocator keeps t alive until the copy is done
        return host

    def wait(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


def to_host(parts: Sequence[torch.Tensor], copies: HostCopies | None = None) -> list[torch.Tensor]:
    """Stored arrays on a device → host tensors (through ``copies`` when given: call its ``wait`` before use)."""
    if copies is None:
        return [p.cpu() for p in parts]
    return [copies.add(p) for p in parts]


# ---------------------------------------------------------------------------------------------
# pooling


def pooled_hw(h: int, w: int, factor: int) -> tuple[int, int]:
    return math.ceil(h / factor), math.ceil(w / factor)


def pool_maps(x, factor: int):
    """float32 ``(n, C, H, W)`` → average-pooled ``(n, C, ceil(H/f), ceil(W/f))`` (torch on its device, or
    NumPy)."""
    if factor <= 1:
        return x
    if isinstance(x, torch.Tensor):
        return F.avg_pool2d(x.float(), factor, factor, ceil_mode=True)
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


def target_pools(info: Any) -> dict[str, tuple[int, int, int]]:
    """``{target: (factor, full_H, full_W)}`` for the pooled targets of a cache (its ``CacheInfo``; empty for
    caches without pooling, which includes every cache written before pooling existed)."""
    return dict(info.pools)
