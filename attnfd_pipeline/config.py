"""Configuration: frozen, validated dataclasses loaded from TOML plus ``--set key=value`` overrides.

A config file is one dataset recipe (``configs/voc.toml``, ``configs/demo.toml`` …). Every section maps
to a dataclass below; unknown keys and wrong types are errors naming the key. The resolved config is
written beside every output (``write_resolved``) so each checkpoint, cache and run describes itself.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from attnfd_pipeline.errors import ConfigError, check
from attnfd_pipeline.targets import EXTRAS, POINTS

__all__ = ["POINTS", "CUSTOM_DATASET", "Config", "ConfigError", "StudentConfig", "TargetSource", "dump_toml",
           "from_dict", "load_config", "parse_override", "write_resolved"]


CUSTOM_DATASET = "custom"  # data.dataset value of a dataset declared in the config itself


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "demo"  # a name from attnfd_pipeline.data.list_datasets(), or "custom" (declared below)
    root: str = "data/demo"  # dataset folder in its public layout
    train_split: str = "train"
    val_split: str = "val"
    num_workers: int = 2  # DataLoader workers (0 = load in the main process)
    # the fields below declare a "custom" dataset without Python (docs/datasets.md); built-ins define their own
    classes: tuple[str, ...] = ()  # class names; list position = train id
    palette: tuple[tuple[int, int, int], ...] = ()  # one RGB colour per class (empty = the VOC colormap)
    ignore_index: int = 255  # stored label value meaning "not labelled" (mapped to train id 255)
    # stored label value (a TOML key, e.g. {0 = 255, 7 = 0}) → train id (255 = ignore); when given it is the
    # whole table: a stored value that is neither a key nor ignore_index is a data error
    label_map: dict[str, int] = field(default_factory=dict)
    layout: Literal["voc", "folders"] = "voc"  # "voc": JPEGImages/…; "folders": images/<split>/ + masks/<split>/

    def __post_init__(self):
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        if self.dataset == CUSTOM_DATASET:
            _check_custom_dataset(self)
        else:
            _check_builtin_dataset(self)

    @property
    def num_classes(self) -> int:
        """The class count the dataset defines (declared classes, or the built-in's)."""
        if self.dataset == CUSTOM_DATASET:
            return len(self.classes)
        from attnfd_pipeline.data.datasets import dataset_info  # numpy only

        return dataset_info(self).num_classes


def _check_builtin_dataset(d: DataConfig) -> None:
    from attnfd_pipeline.data.datasets import list_datasets

    known = list_datasets()
    _check(d.dataset in known, "data.dataset",
           f"unknown dataset {d.dataset!r}; known: {', '.join(known)}, or {CUSTOM_DATASET!r} to declare your own")
    for key, default in (("classes", ()), ("palette", ()), ("ignore_index", 255), ("label_map", {}), ("layout", "voc")):
        _check(getattr(d, key) == default, f"data.{key}",
               f"declares a dataset: only used with data.dataset = \"{CUSTOM_DATASET}\" (the built-in {d.dataset!r} "
               f"defines its own classes, labels and layout)")


def _check_custom_dataset(d: DataConfig) -> None:
    n = len(d.classes)
    _check(n >= 2, "data.classes", f"a custom dataset needs at least 2 class names (got {n})")
    _check(all(c.strip() for c in d.classes), "data.classes", "class names must not be empty")
    dup = sorted({c for c in d.classes if d.classes.count(c) > 1})
    _check(not dup, "data.classes", f"repeated class names: {', '.join(map(repr, dup))}")
    _check(n <= 255, "data.classes", f"{n} classes: at most 255 (train id 255 means ignore)")
    _check(not d.palette or len(d.palette) == n, "data.palette",
           f"{len(d.palette)} colours for {n} classes: give one [r, g, b] per class, or none")
    for i, rgb in enumerate(d.palette):
        _check(all(0 <= v <= 255 for v in rgb), f"data.palette[{i}]", f"{list(rgb)}: values must be in 0..255")
    _check(0 <= d.ignore_index <= 255, "data.ignore_index", f"{d.ignore_index} must be in 0..255")
    for raw, train in d.label_map.items():
        key = f"data.label_map.{raw}"
        _check(raw.isdigit() and 0 <= int(raw) <= 255, key, "keys are stored label values: integers in 0..255")
        _check(0 <= train < n or train == 255, key,
               f"train id {train} is not a class (0..{n - 1}) nor 255 (ignore)")
        _check(int(raw) != d.ignore_index, key, f"{raw} is data.ignore_index; leave it out of the table")
    if not d.label_map:
        _check(d.ignore_index >= n, "data.ignore_index",
               f"{d.ignore_index} is a class train id (0..{n - 1}); without data.label_map stored values are "
               f"train ids, so the ignore value must be >= {n} (e.g. 255)")


@dataclass(frozen=True)
class AugmentConfig:
    """The paper's training augmentation (docs/method.md "Training recipe"); replayed exactly from
    (seed, image index, aug seed)."""

    crop_size: tuple[int, int] = (96, 96)  # (height, width) of the training crop
    base_size: int = 128  # random short side is drawn in [scale_min, scale_max] × base_size
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip_p: float = 0.5
    blur_p: float = 0.5
    blur_radius_max: float = 1.0  # Gaussian blur sigma ~ U(0, blur_radius_max)
    seed: int = 0  # global augmentation seed: part of every replay key
    # how the drawn parameters are applied (augment.AUGMENT_IMPLS): 1 resizes the whole image then crops, 2
    # resamples only the crop's region (same filters, ~2x less CPU at 513 px). A cache records it and replays
    # with it; 1 stays the default so existing caches and the demo's bit-for-bit runs keep their crops.
    impl: int = 1

    def __post_init__(self):
        _check(len(self.crop_size) == 2 and min(self.crop_size) > 0, "augment.crop_size", "must be two positive ints")
        _check(self.base_size > 0, "augment.base_size", "must be > 0")
        _check(0 < self.scale_min <= self.scale_max, "augment.scale_min", "need 0 < scale_min <= scale_max")
        largest = int(self.base_size * self.scale_max)  # the longest short side a random scale can give
        _check(min(self.crop_size) <= largest, "augment.crop_size",
               f"{list(self.crop_size)} is larger than any scaled image can fill (short side at most base_size × "
               f"scale_max = {largest} px): every crop would be partly padding; lower the crop or raise "
               f"augment.base_size / augment.scale_max")
        _check(0 <= self.flip_p <= 1 and 0 <= self.blur_p <= 1, "augment.flip_p/blur_p", "probabilities in [0, 1]")
        _check(self.blur_radius_max >= 0, "augment.blur_radius_max", "must be >= 0")
        _check(self.impl in (1, 2), "augment.impl", "must be 1 (whole-image resize) or 2 (region-only resize)")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "deeplabv3plus_resnet18"  # a name from attnfd_pipeline.models.list_models()
    output_stride: int = 16
    backbone_weights: str = ""  # torchvision-format ImageNet state dict on disk ("" = random init)

    def __post_init__(self):
        _check(self.output_stride in (8, 16), "model.output_stride", "must be 8 or 16")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 8
    lr: float = 0.01  # backbone lr; the head uses lr × head_lr_mult
    head_lr_mult: float = 10.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: Literal["poly", "cosine"] = "poly"  # stepped per iteration
    poly_power: float = 0.9
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    val_batch_size: int = 8
    amp: bool = True  # autocast on CUDA only
    seed: int = 0  # run seed: init, data order, per-epoch aug-seed choice
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    sync_bn: bool = False  # torchrun on GPUs: BatchNorm statistics over all ranks' batches (SyncBatchNorm)
    log_every: int = 10  # steps between rows of <run>/steps.parquet (means over those steps)
    tensorboard: bool = False  # also write the scalars to <run>/tb/ (needs the `tensorboard` extra)

    def __post_init__(self):
        _check(self.epochs > 0, "train.epochs", "must be > 0")
        _check(self.batch_size > 0 and self.val_batch_size > 0, "train.batch_size", "must be > 0")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.eval_every > 0, "train.eval_every", "must be > 0")
        _check(self.log_every > 0, "train.log_every", "must be > 0")
        _check(self.weight_decay >= 0 and self.momentum >= 0, "train.weight_decay", "must be >= 0")


@dataclass(frozen=True)
class TeacherConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="deeplabv3plus_resnet101"))
    train: TrainConfig = field(default_factory=TrainConfig)
    # how the teacher's CBAMs get their weights: docs/method.md "Teacher CBAM modes"
    cbam_mode: Literal["inpath", "fitted", "parameter_free", "untrained"] = "inpath"
    points: tuple[str, ...] = POINTS  # where teacher CBAMs sit
    fit_epochs: int = 2  # "fitted" mode: epochs of side-branch CBAM fitting on the frozen teacher
    fit_lr: float = 0.01

    def __post_init__(self):
        _check_points(self.points, "teacher.points")
        _check(self.fit_epochs > 0, "teacher.fit_epochs", "must be > 0")


@dataclass(frozen=True)
class CacheConfig:
    root: str = "cache"  # cache root: one sub-directory per fingerprint
    K: int = 4  # augmentation seeds cached per training image
    points: tuple[str, ...] = POINTS  # refined maps F'' stored as arrays "B", "E", "D"
    extra: tuple[str, ...] = ()  # optional extra targets: "logits", "raw" (raw_B, raw_E, raw_D)
    codec: Literal["zstd", "blosc", "none"] = "zstd"
    level: int = 1  # higher levels buy nothing for float16 maps (measured ratios: docs/method.md)
    mantissa_bits: int = 0  # 0 = keep float16's 10 bits; 1..9 = round the mantissa (lossy, recorded)
    shard_size: int = 8  # samples (images) per shard; one writer owns whole shards
    batch_size: int = 8  # teacher inference batch
    # how targets are stored: float16, or int8 = uint8 codes + float32 scale/offset per (sample, channel)
    encoding: Literal["float16", "int8"] = "float16"
    # per refined point, store its map average-pooled by this factor (TOML: pool = {D = 2}); the student's
    # map is pooled the same way before the loss (a variant of the loss). Kept as sorted (point, factor) pairs
    pool: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        _check(self.K > 0, "cache.K", "must be > 0")
        _check_points(self.points, "cache.points")
        for p, f in self.pool:
            _check(p in self.points, "cache.pool", f"point {p!r} is not in cache.points {list(self.points)}")
            _check(f >= 1, "cache.pool", f"factor of {p!r} must be an integer >= 1, got {f}")
        _check(len({p for p, _ in self.pool}) == len(self.pool), "cache.pool", "a point is given twice")
        # factor 1 is no pooling: dropped, so {D = 1} and {} are the same cache
        object.__setattr__(self, "pool", tuple(sorted((p, f) for p, f in self.pool if f > 1)))
        _check(self.encoding == "float16" or self.mantissa_bits in (0, 10), "cache.mantissa_bits",
               f"rounds float16 mantissas; it does not apply to encoding {self.encoding!r} (set it to 0)")
        for e in self.extra:
            _check(e in EXTRAS, "cache.extra", f"unknown extra target {e!r}; known: {', '.join(EXTRAS)}")
        _check(0 <= self.mantissa_bits <= 10, "cache.mantissa_bits", "must be in [0, 10]")
        _check(self.shard_size > 0 and self.batch_size > 0, "cache.shard_size", "must be > 0")


EVAL_PROTOCOLS = ("reference", "whole", "center_crop")


@dataclass(frozen=True)
class EvalConfig:
    """How validation images are scored (docs/inference.md): every result names its protocol, since numbers
    under different protocols are not comparable."""

    # "reference": the short side of image and label resized to min(augment.crop_size), aspect kept, one
    # image per batch (the AttnFD / AICSD released code, what their published numbers use); "whole": original
    # resolution, sliding window when larger than ``window`` (mmsegmentation, CIRKD, Af-DCD); "center_crop":
    # short side resized to the crop, centre crop (the default, so configs written before this section score
    # as they did)
    protocol: Literal["reference", "whole", "center_crop"] = "center_crop"
    window: tuple[int, int] = (0, 0)  # "whole": sliding-window (h, w); (0, 0) = augment.crop_size
    stride: tuple[int, int] = (0, 0)  # "whole": window step (h, w); (0, 0) = 2/3 of the window (mmseg's overlap)

    def __post_init__(self):
        _check(len(self.window) == 2 and min(self.window) >= 0, "eval.window", "must be two ints >= 0")
        _check(len(self.stride) == 2 and min(self.stride) >= 0, "eval.stride", "must be two ints >= 0")
        _check((min(self.window) > 0) == (max(self.window) > 0), "eval.window",
               f"{list(self.window)}: give both sides, or [0, 0] for the crop size")
        _check((min(self.stride) > 0) == (max(self.stride) > 0), "eval.stride",
               f"{list(self.stride)}: give both sides, or [0, 0] for 2/3 of the window")
        if min(self.window) > 0 and min(self.stride) > 0:
            _check(all(s <= w for s, w in zip(self.stride, self.window)), "eval.stride",
                   f"{list(self.stride)} is larger than the window {list(self.window)}: pixels between windows "
                   f"would never be scored")


class TargetSource(enum.StrEnum):
    """Where Stage 2 gets its teacher targets (``student.targets``), and on which crops."""

    CACHED = "cached"  # read from the cache, on the replays of the K cached augmentation seeds
    ONLINE_REPLAY = "online-replay"  # the frozen teacher every step, on the same replayed crops (checks the cache)
    ONLINE_FRESH = "online-fresh"  # the frozen teacher every step, on a fresh augmentation draw every epoch

    @property
    def online(self) -> bool:
        return self is not TargetSource.CACHED

    @property
    def fresh(self) -> bool:
        """A fresh augmentation draw every epoch rather than the K cached seeds."""
        return self is TargetSource.ONLINE_FRESH

    @property
    def mode(self) -> str:
        """What result.json records as ``mode``: ``cached`` or ``online``."""
        return "online" if self.online else "cached"

    @property
    def augment(self) -> str:
        """What result.json records as ``augment``: ``replay`` or ``fresh``."""
        return "fresh" if self.fresh else "replay"

    @property
    def tag(self) -> str:
        """The run-name and report tag: ``cached``, ``online`` or ``online-fresh`` (names of finished runs)."""
        return self.value if self.fresh else self.mode

    @classmethod
    def of(cls, mode: str, augment: str = "replay") -> "TargetSource":
        """From a result.json's ``mode`` and ``augment`` (or the older ``student.mode`` / ``online_fresh``
        settings as ``augment`` ``fresh``): fresh crops only count with the teacher online."""
        if mode != "online":
            return cls.CACHED
        return cls.ONLINE_FRESH if augment == "fresh" else cls.ONLINE_REPLAY


# the cached-seed order of runs that predate ``student.seed_order`` (their result.json / last.pt do not record it)
LEGACY_SEED_ORDER = "random"


@dataclass(frozen=True)
class StudentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: str = "attnfd"  # distillation method(s) from the losses registry; combine with "+", e.g. "attnfd+kd"
    alpha: float = 2.0  # weight of the distillation term; 0 = plain student
    norm: Literal["batch", "sample", "channel"] = "batch"  # L_Attn normalisation (docs/method.md "Loss")
    points: tuple[str, ...] = POINTS
    connector_warmup_epochs: int = 0  # reference: 1 epoch training only the connectors
    # Recipe details where the paper's text and the released AttnFD code differ
    # (docs/method.md "Paper text and released code"): the defaults are the paper's reading, the paper configs
    # set the released code's.
    # CE divided again by the batch size n (the released loss's batch_average): AttnFD weighs n× more against CE
    ce_batch_average: bool = False
    # "conv_bn": only Conv2d / BatchNorm parameters learn, as the released optimiser takes; the student CBAMs'
    # channel MLPs (Linear layers there) then stay at their initialisation. "all": every CBAM parameter learns
    cbam_trainable: Literal["all", "conv_bn"] = "all"
    # "warmup_only": the connectors learn during the connector warm-up alone, in their own group at the
    # backbone lr (the released warm-up optimiser has one group, which its scheduler sets to 1× lr), and are
    # frozen after it; "always": they learn in every epoch with the head (10× lr)
    connector_schedule: Literal["always", "warmup_only"] = "always"
    # "tap": a CBAM learns at the lr of the module whose output it refines (the backbone point B at the
    # backbone lr, as the released code holds that CBAM inside the backbone); "head": every CBAM at the head lr
    cbam_lr: Literal["head", "tap"] = "head"
    # where the teacher targets come from: "cached" (the cache), "online-replay" (the frozen teacher every step on
    # the same replayed crops: exactly comparable to cached) or "online-fresh" (the teacher on a fresh draw every
    # epoch, as the teacher trained); the older spelling student.mode / student.online_fresh is still read
    targets: TargetSource = TargetSource.CACHED
    # which cached seed an image is shown with each epoch: "cycle" = every seed once per K epochs (without
    # replacement, in a shuffled order), "random" = an independent choice every epoch (what a run that does not
    # record its order followed)
    seed_order: Literal["cycle", "random"] = "cycle"
    # the distillation methods' config sections by method name, ``[student.<method>]`` in TOML, read as
    # ``cfg.student.<method>``: each method declares its own section beside its loss (losses.base.MethodSection);
    # a section is used only when its method is in ``student.method``; missing ones are at their defaults
    sections: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        _check(self.alpha >= 0, "student.alpha", "must be >= 0")
        object.__setattr__(self, "sections", _method_sections(self.sections))
        _check_points(self.points, "student.points")
        _check(self.connector_warmup_epochs >= 0, "student.connector_warmup_epochs", "must be >= 0")
        _check(self.connector_schedule == "always" or self.connector_warmup_epochs >= 1,
               "student.connector_schedule", "\"warmup_only\" trains the connectors during the warm-up alone: set "
               "student.connector_warmup_epochs >= 1 (the released code warms up for 1 epoch), or use \"always\"")
        object.__setattr__(self, "targets", _coerce(TargetSource, self.targets, "student.targets"))
        _check(isinstance(self.method, str) and bool(self.method.strip()), "student.method",
               "names one distillation method or several joined by '+', e.g. \"attnfd+kd\"")
        from attnfd_pipeline.losses import parse_methods  # the registry: unknown, empty or repeated names

        parse_methods(self.method)

    def __getattr__(self, name: str):
        """``student.<method>``: the method's config section."""
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def method_params(self, name: str):
        """The config section of method ``name`` (None for a name that is not a registered method)."""
        return self.sections.get(name)

    def method_weight(self, name: str) -> float:
        """w_m, the factor on ``student.alpha`` of method ``name``'s loss: its section's ``alpha × weight``
        divided by ``student.alpha`` (just ``weight`` when the section has no ``alpha`` of its own, or
        when ``student.alpha`` is 0 and no method trains)."""
        params = self.method_params(name)
        weight = float(getattr(params, "weight", 1.0))
        own = getattr(params, "alpha", None)
        if own is None or self.alpha == 0:
            return weight
        return own * weight / self.alpha

    def method_recipe(self, name: str) -> dict[str, Any]:
        """Method ``name``'s section as what it trains with: ``weight`` is ``method_weight`` and ``alpha`` is
        folded into it, so two configs that give a method the same effective weight compare equal (and
        runs named or matched by it are reused) whether they set ``alpha`` or an α-relative ``weight``."""
        params = self.method_params(name)
        if params is None:
            return {}
        out = {k: v for k, v in dataclasses.asdict(params).items() if k != "alpha"}
        for f in dataclasses.fields(params):
            if f.metadata.get("recipe") == "when_set" and getattr(params, f.name) == f.default:
                del out[f.name]
        out["weight"] = self.method_weight(name)
        return out

    def default_method_recipe(self, name: str) -> dict[str, Any]:
        """``method_recipe`` of method ``name`` with its section at the defaults."""
        params = self.method_params(name)
        if params is None:
            return {}
        return dataclasses.replace(self, sections={**self.sections, name: type(params)()}).method_recipe(name)


def _method_sections(given: Mapping[str, Any]) -> dict[str, Any]:
    """Every registered method's section (registration order): ``given``'s, or the section at its defaults.
    The registry is imported here, not at the top: the methods import their sections' base from the losses
    package, which needs torch; a config that is only read does not."""
    from attnfd_pipeline.losses import method_sections

    known = method_sections()
    for name, section in given.items():
        _check(name in known, f"student.{name}", f"no distillation method of that name has a config section "
               f"(methods: {', '.join(known)})")
        _check(isinstance(section, known[name]), f"student.{name}",
               f"expected a {known[name].__name__}, got {type(section).__name__}")
    return {name: given.get(name) or cls() for name, cls in known.items()}


@dataclass(frozen=True)
class Config:
    name: str = "demo"  # run folder name under runs_root
    runs_root: str = "runs"
    num_classes: int = 0  # 0 = take it from the dataset definition
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # validation protocol of every stage and `attnfd evaluate`

    def __post_init__(self):
        if self.num_classes:
            n = self.data.num_classes
            how = ("data.classes lists" if self.data.dataset == CUSTOM_DATASET
                   else f"data.dataset {self.data.dataset!r} has")
            hint = ("" if self.data.dataset == CUSTOM_DATASET else
                    f"; for a dataset of {self.num_classes} classes declare it: data.dataset = \"{CUSTOM_DATASET}\" "
                    f"with data.classes = [...] (docs/datasets.md)")
            _check(self.num_classes == n, "num_classes",
                   f"{self.num_classes} but {how} {n} classes (0 = take the dataset's count){hint}")

    @property
    def run_root(self) -> Path:
        return Path(self.runs_root) / self.name

    @property
    def teacher_dir(self) -> Path:
        return self.run_root / "teacher"

    def to_dict(self) -> dict[str, Any]:
        """Plain values in the shape of a config file: the method sections as ``student.<method>`` tables."""
        out = _to_plain(dataclasses.asdict(self))
        out["student"].update(out["student"].pop("sections"))
        return out


_check = check


def _check_points(points, key: str) -> None:
    _check(len(points) > 0, key, "needs at least one point")
    for p in points:
        _check(p in POINTS, key, f"unknown point {p!r}; known: {', '.join(POINTS)}")
    _check(len(set(points)) == len(points), key, "points repeat")


def _to_plain(obj):
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# building dataclasses from plain dicts, with type checks


def from_dict(cls, data: dict[str, Any], where: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    if cls is StudentConfig:
        data = _student_targets(data, where)
        names.discard("sections")  # not a key: the sections are the student table's method-named tables
        from attnfd_pipeline.losses import method_sections

        known = method_sections()
        kwargs["sections"] = {k: from_dict(known[k], data[k], _join(where, k)) for k in known if k in data}
        data = {k: v for k, v in data.items() if k not in known}
        names |= set(known)
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{_join(where, unknown[0])}: unknown key (known: {', '.join(sorted(names))})")
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, _join(where, key))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(_qualify(where, str(e))) from None


# the older spelling of ``student.targets``: student.mode ("cached" | "online") and student.online_fresh (bool)
LEGACY_TARGET_KEYS = ("mode", "online_fresh")


def _student_targets(data: dict[str, Any], where: str) -> dict[str, Any]:
    """``data`` (a student table) with ``mode`` / ``online_fresh`` read into ``targets``; where ``targets``
    is given too, the older keys must agree with it."""
    legacy = {k: data[k] for k in LEGACY_TARGET_KEYS if k in data}
    if not legacy:
        return data
    data = {k: v for k, v in data.items() if k not in LEGACY_TARGET_KEYS}
    given = _coerce(TargetSource, data["targets"], _join(where, "targets")) if "targets" in data else None
    mode_key, fresh_key = _join(where, "mode"), _join(where, "online_fresh")
    mode = _coerce(Literal["cached", "online"], legacy.get("mode", given.mode if given else "cached"), mode_key)
    fresh = _coerce(bool, legacy.get("online_fresh", given.fresh if given else False), fresh_key)
    _check(not (fresh and mode != "online"), fresh_key,
           f"fresh augmentation needs the teacher online: set {mode_key} = \"online\" (it is {mode!r}) "
           f"or {fresh_key} = false")
    implied = TargetSource.of(mode, "fresh" if fresh else "replay")
    if given is not None and given is not implied:
        said = ", ".join(f"{_join(where, k)} = {json.dumps(v)}" for k, v in legacy.items())
        raise ConfigError(f"{_join(where, 'targets')}: {given.value!r} contradicts {said} (the older spelling of "
                          f"the same setting, meaning {implied.value!r}); set only {_join(where, 'targets')}")
    return {**data, "targets": implied}


def targets_of(student: dict[str, Any]) -> TargetSource:
    """The target source a student table names in either spelling (``_student_targets`` is the one place the
    older ``student.mode`` / ``student.online_fresh`` is translated); ``cached`` where it names none, a
    ``ConfigError`` naming the key where it names one this version does not know."""
    targets = _student_targets(dict(student), "student").get("targets", TargetSource.CACHED)
    return _coerce(TargetSource, targets, "student.targets")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _qualify(where: str, message: str) -> str:
    """Give a ``__post_init__`` message its full key: in table ``teacher.train``, "train.lr: must be > 0"
    becomes "teacher.train.lr: must be > 0"; a message already starting with the full key is kept."""
    if not where:
        return message
    key, sep, rest = message.partition(": ")
    if sep and " " not in key:
        if key.startswith(where + "."):
            return message
        parent, _, last = where.rpartition(".")
        if key.split(".")[0] == last:
            return f"{_join(parent, key)}: {rest}"
    return f"{where}: {message}"


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__} {value!r}")
        return {_coerce(key_tp, str(k), f"{key}.{k}"): _coerce(value_tp, v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [m.value for m in tp]
        if isinstance(value, tp) or value in allowed:
            return tp(value)
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, dict) and len(args) == 2 and args[1] is Ellipsis and typing.get_origin(args[0]) is tuple:
            value = [list(kv) for kv in value.items()]  # a TOML table {D = 2} as (key, value) pairs
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} does not fit {tp}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in this module


# ---------------------------------------------------------------------------------------------
# files and overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"student.train.lr=0.01"`` → (["student", "train", "lr"], 0.01). Values are TOML literals;
    anything that is not valid TOML is taken as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. student.alpha=2")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def _deep_set(data: dict, path: list[str], value) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a table")
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a TOML config file (None = all defaults) and apply ``KEY=VALUE`` overrides. Relative paths the file
    sets (``data.root``, ``runs_root``, ``cache.root``) are relative to its folder; those of overrides and
    defaults to the current folder."""
    data: dict[str, Any] = {}
    where = ""
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        _paths_from(data, path.parent)
    from_file = set(data.get("student") or ()) if isinstance(data.get("student"), dict) else set()
    for text in overrides:
        keys, value = parse_override(text)
        _drop_other_spelling(data, keys, from_file)
        _deep_set(data, keys, value)
    try:
        return from_dict(Config, data)
    except ConfigError as e:
        source = _source_of(str(e), overrides, where)
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None


def _source_of(message: str, overrides: typing.Sequence[str], where: str) -> str:
    """Where the bad value came from: ``--set KEY=VALUE (over FILE)`` when an override set the key the error is
    about (the last one wins, as in loading), else the file ('' for defaults)."""
    for text in reversed(overrides):
        dotted = ".".join(parse_override(text)[0])
        if message.startswith((f"{dotted}:", f"{dotted}.")):
            return f"--set {text}" + (f" (over {where})" if where else "")
    return where


# the settings that are paths on the local disk: relative ones written in a config file are relative to the
# file's folder (``--set`` values and defaults: to the current folder); a URL (``memory://``, ``s3://``) is kept
PATH_KEYS = (("data", "root"), ("runs_root",), ("cache", "root"))


def _is_relative_path(value) -> bool:
    return isinstance(value, str) and bool(value) and "://" not in value and not os.path.isabs(value)


def _paths_from(data: dict, folder: Path) -> None:
    """Rewrite the relative paths a config file sets (``PATH_KEYS``) as paths from the current folder: the short
    relative form when they lie under it (the shipped configs, run from the repository, keep their paths),
    absolute otherwise."""
    for *tables, key in PATH_KEYS:
        table = data
        for t in tables:
            table = table.get(t) if isinstance(table.get(t), dict) else {}
        if _is_relative_path(table.get(key)):
            full = os.path.normpath(os.path.join(os.path.abspath(folder), table[key]))
            short = os.path.relpath(full)
            table[key] = full if short.split(os.sep)[0] == os.pardir else short


def _paths_for(cfg: Config, folder: Path) -> Config:
    """``cfg`` with its relative paths rewritten relative to ``folder``, for a config file written there."""
    def rebase(value: str) -> str:
        return os.path.relpath(os.path.abspath(value), os.path.abspath(folder)) if _is_relative_path(value) else value

    return dataclasses.replace(cfg, runs_root=rebase(cfg.runs_root),
                               data=dataclasses.replace(cfg.data, root=rebase(cfg.data.root)),
                               cache=dataclasses.replace(cfg.cache, root=rebase(cfg.cache.root)))


def _drop_other_spelling(data: dict, keys: list[str], from_file: set[str]) -> None:
    """An override of where the targets come from replaces what the file says in the other spelling
    (``student.targets`` vs ``student.mode`` / ``student.online_fresh``): an override wins over the file
    whichever spelling each uses. ``from_file``: the student keys the file set (shrinks as they are dropped)."""
    if len(keys) != 2 or keys[0] != "student" or keys[1] not in ("targets", *LEGACY_TARGET_KEYS):
        return
    other = LEGACY_TARGET_KEYS if keys[1] == "targets" else ("targets",)
    for k in other:
        if k in from_file:
            data["student"].pop(k, None)
            from_file.discard(k)


def dump_toml(cfg: Config) -> str:
    """Serialise a config as TOML (readable back by ``load_config``). TOML has no null: an unset optional key
    (None) is left out and reads back as its default, None."""
    import tomli_w

    def present(obj):
        return {k: present(v) if isinstance(v, dict) else v for k, v in obj.items() if v is not None}

    return tomli_w.dumps(present(cfg.to_dict()))


def write_resolved(cfg: Config, directory: str | Path) -> Path:
    """Write ``config.resolved.toml`` into ``directory`` atomically (its relative paths rewritten from
    ``directory``, so it loads back as the same config from anywhere); returns its path."""
    from attnfd_pipeline.utils import atomic_write_text

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(directory / "config.resolved.toml", dump_toml(_paths_for(cfg, directory)))
