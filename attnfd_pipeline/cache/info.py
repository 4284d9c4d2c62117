"""``cache.json``, typed: ``CacheInfo`` (and one ``TargetInfo`` per array) is what the build writes and every
reader, finder, checker and verifier reads, instead of a free-form dict.

``CacheInfo.from_json`` reads every ``cache.json`` written so far: ``CACHE_JSON.migrate`` brings an older
format to the current one (``formats.SavedFormat``), then the current shape is parsed, naming the file and
key of anything missing or ill-typed. A build writes ``cache.json`` only where there is none, so a resumed
older cache keeps its file, and with it its checksum algorithm (``storage.write_json`` sorts the keys).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnfd_pipeline.cache import storage
from attnfd_pipeline.cache.encoding import CHECKSUM, CHECKSUMS, DEFAULT_ENCODING, LEGACY_CHECKSUM
from attnfd_pipeline.cache.errors import CacheError
from attnfd_pipeline.cache.schema import FORMAT, FORMATS, paths
from attnfd_pipeline.formats import SavedFormat
from attnfd_pipeline.targets import extra_for


def _v1_to_v2(d: dict) -> dict:
    """attnfd-cache/2 records the per-sample manifest checksum (crc32c from then on): a /1 cache was
    checksummed with blake2b; a /1 file written before ``cache.encoding`` existed holds float16 targets."""
    d.setdefault("encoding", "float16")
    d["checksum"] = LEGACY_CHECKSUM
    return d


CACHE_JSON = SavedFormat("cache.json", FORMATS, {FORMATS[0]: _v1_to_v2}, error=CacheError)


def _get(d: Mapping, key: str, types: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    """``d[key]``, checked against ``types`` (a bool is not an int); CacheError naming ``where`` and the key."""
    if key not in d:
        if default is not ...:
            return default
        raise CacheError(f"{where}: key {key!r} is missing")
    value = d[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
        names = " or ".join(t.__name__ for t in _tuple(types))
        raise CacheError(f"{where}: key {key!r} is {type(value).__name__} {value!r}, expected {names}")
    return value


def _tuple(types) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _ints(d: Mapping, key: str, n: int, where: str, default: Any = ...) -> tuple[int, ...] | None:
    value = _get(d, key, list, where, default)
    if value is None:
        return None
    if len(value) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CacheError(f"{where}: key {key!r} is {value!r}, expected a list of {n} integers")
    return tuple(value)


@dataclass(frozen=True)
class TargetInfo:
    """One entry of ``cache.json`` ``targets``: how one teacher target is stored."""

    chw: tuple[int, int, int]  # stored (C, H, W): after pooling when the target is pooled
    kind: str  # "refined", "raw" or "logits" (targets.target_kind)
    point: str | None  # distillation point (None for logits)
    stride: int | float  # crop height / stored H
    bytes_per_sample: int  # stored bytes of one sample of this target, all its arrays
    pool: int = 1  # average-pooling factor (cache.pool); 1 = stored at the teacher's resolution
    full_chw: tuple[int, int, int] | None = None  # the teacher's (C, H, W) before pooling; only when pooled

    @property
    def teacher_chw(self) -> tuple[int, int, int]:
        """(C, H, W) of the teacher's output (before any pooling)."""
        return self.full_chw or self.chw

    @classmethod
    def from_json(cls, d: Any, where: str) -> "TargetInfo":
        if not isinstance(d, dict):
            raise CacheError(f"{where}: expected a table, got {type(d).__name__}")
        pool = _get(d, "pool", int, where, 1)
        full = _ints(d, "full_chw", 3, where, None)
        if pool > 1 and full is None:
            raise CacheError(f"{where}: key 'full_chw' is missing (the target is pooled by {pool})")
        return cls(chw=_ints(d, "chw", 3, where), kind=_get(d, "kind", str, where),
                   point=_get(d, "point", (str, type(None)), where), stride=_get(d, "stride", (int, float), where),
                   bytes_per_sample=_get(d, "bytes_per_sample", int, where), pool=pool, full_chw=full)

    def to_json(self) -> dict[str, Any]:
        out = {"chw": list(self.chw), "kind": self.kind, "point": self.point, "stride": self.stride,
               "bytes_per_sample": self.bytes_per_sample}
        if self.pool > 1:  # part of the cache.json definition: an unpooled entry is the same as before pooling
            out.update(pool=self.pool, full_chw=list(self.teacher_chw))
        return out


@dataclass(frozen=True)
class CacheInfo:
    """A cache's ``cache.json``: its fingerprint, the inputs hashed into it, and the layout of its arrays."""

    fingerprint: str  # SHA-256 of ``inputs`` (fingerprint.fingerprint_of); its first 16 hex digits name the folder
    inputs: dict[str, Any]  # everything the fingerprint hashes (fingerprint.cache_inputs), as plain JSON
    teacher: dict[str, Any]  # the teacher bundle's info (sha256, model, CBAM mode …)
    num_images: int  # N: images of the dataset split
    K: int  # augmentation seeds per image
    shard_size: int  # S: images per shard (the unit of commit)
    num_shards: int  # ceil(N / S)
    crop_size: tuple[int, int]  # (H, W) of the augmented crops the teacher saw
    target_names: tuple[str, ...]  # array order: the refined points, then logits, then raw_<point>
    targets: dict[str, TargetInfo]  # per target name
    dtype: str  # of the main arrays: float16, or uint8 codes for int8
    codec: str  # zstd, blosc or none (then crc32c)
    level: int  # codec level (0 for none)
    mantissa_bits: int  # float16 mantissa bits kept (10 = all)
    lossy: tuple[str, ...]  # the lossy steps from the teacher's float32 to what is stored, in words
    teacher_batch_size: int  # crops per teacher forward during the build (not fingerprinted)
    encoding: str = DEFAULT_ENCODING  # float16 or int8 (cache.encoding)
    format: str = FORMAT  # the layout version read: always the current one (CACHE_JSON.migrate)
    checksum: str = CHECKSUM  # the per-sample manifest checksum (encoding.CHECKSUMS)
    written_as: str = FORMAT  # the version the file was written in (an older cache keeps its file)

    # -- derived --------------------------------------------------------------------------------
    @property
    def points(self) -> tuple[str, ...]:
        """The refined distillation points the cache holds."""
        return tuple(n for n in self.target_names if self.targets[n].kind == "refined")

    @property
    def extra(self) -> tuple[str, ...]:
        """The ``cache.extra`` entries (``logits``, ``raw``) this cache was built with."""
        return extra_for(self.target_names)

    @property
    def shapes(self) -> dict[str, tuple[int, int, int]]:
        """Stored (C, H, W) per target."""
        return {n: self.targets[n].chw for n in self.target_names}

    @property
    def pools(self) -> dict[str, tuple[int, int, int]]:
        """``{target: (factor, full H, full W)}`` of the pooled targets (empty for an unpooled cache)."""
        return {n: (t.pool, t.teacher_chw[1], t.teacher_chw[2]) for n, t in self.targets.items() if t.pool > 1}

    @property
    def samples(self) -> int:
        return self.num_images * self.K

    @property
    def teacher_sha256(self) -> str:
        return self.inputs["teacher_sha256"]

    @property
    def dataset(self) -> dict[str, Any]:
        """The identity of the dataset split the cache was built on."""
        return self.inputs["dataset"]

    @property
    def augment(self) -> dict[str, Any]:
        """The augmentation recipe (``AugmentConfig`` as a dict) the samples were drawn with."""
        return self.inputs["augment"]

    # -- cache.json -----------------------------------------------------------------------------
    @classmethod
    def from_json(cls, d: Any, path: str | Path = "cache.json") -> "CacheInfo":
        """Parse a ``cache.json`` object; CacheError naming ``path`` and the key when one is missing or of the
        wrong type, or when the file is not a cache description at all."""
        if not isinstance(d, dict) or d.get("format") not in FORMATS or not isinstance(d.get("fingerprint"), str):
            fmt = d.get("format") if isinstance(d, dict) else None
            raise CacheError(f"{path}: not an attnfd cache description (format {fmt!r}, expected one of "
                             f"{', '.join(FORMATS)})")
        written_as, d = d["format"], CACHE_JSON.migrate(d, str(path))
        names = tuple(_get(d, "target_names", list, str(path)))
        if not all(isinstance(n, str) for n in names):
            raise CacheError(f"{path}: key 'target_names' is {list(names)!r}, expected a list of names")
        table = _get(d, "targets", dict, str(path))
        missing = [n for n in names if n not in table]
        if missing:
            raise CacheError(f"{path}: key 'targets' has no entry for {missing} (target_names lists them)")
        inputs = _get(d, "inputs", dict, str(path))
        for key, tp in (("teacher_sha256", str), ("dataset", dict), ("augment", dict)):
            _get(inputs, key, tp, f"{path}: inputs")
        g = lambda key, tp, *default: _get(d, key, tp, str(path), *default)  # noqa: E731
        return cls(fingerprint=d["fingerprint"], inputs=inputs, teacher=g("teacher", dict),
                   num_images=g("num_images", int), K=g("K", int), shard_size=g("shard_size", int),
                   num_shards=g("num_shards", int), crop_size=_ints(d, "crop_size", 2, str(path)),
                   target_names=names,
                   targets={n: TargetInfo.from_json(table[n], f"{path}: targets.{n}") for n in names},
                   dtype=g("dtype", str), codec=g("codec", str), level=g("level", int),
                   mantissa_bits=g("mantissa_bits", int), lossy=tuple(g("lossy", list)),
                   teacher_batch_size=g("teacher_batch_size", int), encoding=g("encoding", str),
                   format=d["format"], checksum=_checksum(d, str(path)), written_as=written_as)

    def to_json(self) -> dict[str, Any]:
        """The ``cache.json`` object of the current format (what a new build writes)."""
        return {
            "format": self.format, "fingerprint": self.fingerprint, "inputs": json.loads(json.dumps(self.inputs)),
            "teacher": json.loads(json.dumps(self.teacher)), "num_images": self.num_images, "K": self.K,
            "shard_size": self.shard_size, "num_shards": self.num_shards, "crop_size": list(self.crop_size),
            "target_names": list(self.target_names),
            "targets": {n: self.targets[n].to_json() for n in self.target_names},
            "dtype": self.dtype, "codec": self.codec, "level": self.level, "mantissa_bits": self.mantissa_bits,
            "lossy": list(self.lossy), "teacher_batch_size": self.teacher_batch_size, "encoding": self.encoding,
            "checksum": self.checksum,
        }


def _checksum(d: Mapping, where: str) -> str:
    """The recorded checksum algorithm of a (current-format) ``cache.json``."""
    algo = _get(d, "checksum", str, where)
    if algo not in CHECKSUMS:
        raise CacheError(f"{where}: key 'checksum' is {algo!r}, expected one of {', '.join(CHECKSUMS)}")
    return algo


def load_info(cache_dir: str | Path) -> CacheInfo:
    """The ``CacheInfo`` of the cache at ``cache_dir`` (a path or an fsspec URL); CacheError naming the folder
    when it is not a cache, and the file and key when its ``cache.json`` is unreadable or incomplete."""
    p = paths(cache_dir)["info"]
    if not storage.is_file(p):
        raise CacheError(f"{cache_dir}: not a cache (no cache.json); run `attnfd cache build`")
    try:
        d = json.loads(storage.read_bytes(p))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{p}: unreadable cache.json ({e}); {cache_dir} is not a usable cache") from None
    try:
        return CacheInfo.from_json(d, p)
    except CacheError as e:
        raise CacheError(f"{e}; {cache_dir} is not a usable cache") from None
