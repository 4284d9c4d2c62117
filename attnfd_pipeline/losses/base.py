"""What a distillation method is, and the registry that finds one by name.

A method (a ``DistillMethod`` subclass, registered with ``@register``) declares

- ``required_targets(points, params)``: the teacher targets it reads at ``points`` under its config section
  ``params`` (None = the section's defaults), named as in the cache — ``"B"``, ``"E"``,
  ``"D"`` (refined F''), ``"raw_B"`` … (raw teacher features), ``"logits"`` (teacher logits at the
  decoder's resolution). Stage 2 refuses a cache that lacks one of them;
- its trainable modules (connectors, projectors …), built in ``__init__`` from a ``MethodContext``
  (student tap channels, teacher target shapes, its config section);
- its loss: ``forward(out, targets, epoch, batch) -> (loss, logs)`` where ``out`` is the student's output
  dict ("out", "logits", raw taps "B", "E", "D") and ``targets`` the teacher targets (float16 from the
  cache or float32 online; methods compute in float32).

Stage 2's loss is ``ce_weight(epoch) · CE + α · Σ_m w_m · L_m`` over the methods of ``student.method``
(``"attnfd"``, ``"attnfd+kd"`` …) with ``w_m = StudentConfig.method_weight(m)``: ``student.<m>.weight``, or
``student.<m>.alpha × weight / α`` for a method with an α of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from attnfd_pipeline.errors import ConfigError, UserError, check

# field metadata of a section key added after runs were named: at its default it is left out of the method's
# recipe (``StudentConfig.method_recipe``), so the names and matching of earlier runs stay as they were
WHEN_SET = {"recipe": "when_set"}


@dataclass(frozen=True)
class MethodSection:
    """A method's config section ``student.<name>`` (a frozen dataclass the method declares beside its loss, as
    ``params_type``; ``register`` makes it a key of the student config). Stage 2's loss is
        ce_weight(epoch) · CE + Σ_m α_m · weight_m · L_m,   α_m = student.<m>.alpha, or student.alpha when unset
    A rival whose own paper fixes its weight sets ``alpha`` in its section, so an α sweep of AttnFD (or a change
    of student.alpha) cannot silently change that rival's weight; student.alpha = 0 is always the plain student."""

    weight: float = 1.0  # weight inside a method combination (× the method's α)
    alpha: float | None = None  # this method's own α; unset = student.alpha

    method: ClassVar[str] = ""  # the section's method name (set by ``register``): the keys its errors name

    def key(self, name: str) -> str:
        """The full config key of field ``name``: ``student.<method>.<name>``."""
        return f"student.{self.method}.{name}"

    def __post_init__(self):
        check(self.weight >= 0, self.key("weight"), "must be >= 0")
        check(self.alpha is None or self.alpha >= 0, self.key("alpha"), "must be >= 0")


@dataclass(frozen=True)
class MethodContext:
    """Everything a method's modules are built from."""

    points: tuple[str, ...]  # student.points: the distillation points the method works at
    student_channels: Mapping[str, int]  # student tap → channels ("B", "E", "D")
    target_shapes: Mapping[str, tuple[int, int, int]]  # teacher target name → (C, H, W); H, W may be 0 if unknown
    num_classes: int = 0
    epochs: int = 1  # total training epochs (schedules such as AICSD's adaptive weighting)
    norm: str = "batch"  # feature normalisation of the mimicking losses (attnfd, lad): docs/method.md "Loss"
    params: Any = None  # the method's config section (``student.<name>``); None = its defaults
    extra: Mapping[str, Any] = field(default_factory=dict)
    # teacher target → (factor, full H, full W) for targets the cache stores average-pooled (cache.pool):
    # the method pools the student's map the same way before comparing
    target_pool: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)


class DistillMethod(nn.Module):
    """Base class: a named loss with its own trainable modules."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""  # short citation, shown by ``list_methods(verbose=True)``
    label: ClassVar[str] = ""  # display name in tables and reports ("Af-DCD"); "" = the name
    # the Stage 2 settings (of "points", "norm") its loss depends on: reports match runs on these only
    uses: ClassVar[frozenset[str]] = frozenset()
    params_type: ClassVar[type[MethodSection]] = MethodSection  # its config section (a MethodSection subclass)

    def __init__(self, ctx: MethodContext):
        super().__init__()
        self.points = tuple(ctx.points)
        self.params = ctx.params if ctx.params is not None else self.params_type()

    @classmethod
    def required_targets(cls, points: Sequence[str], params: Any = None) -> tuple[str, ...]:
        raise NotImplementedError

    def targets(self) -> tuple[str, ...]:
        return type(self).required_targets(self.points, self.params)

    def forward(self, out: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor], epoch: int = 0,
                batch: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def warmup_loss(self, out, targets, epoch: int = 0, batch=None) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss during the connector warm-up epochs, where the student is frozen (``out`` computed under
        ``no_grad``): by default the method's own loss, which then trains only the method's modules."""
        return self(out, targets, epoch, batch)

    def ce_weight(self, epoch: int) -> float:
        """Factor on the segmentation CE in ``epoch`` (1 unless the method re-weights it, e.g. AICSD)."""
        return 1.0

    def grad_clip(self) -> float:
        """Max gradient norm of the method's own modules, clipped before each optimiser step (0 = none)."""
        return 0.0

    def has_parameters(self) -> bool:
        return any(True for _ in self.parameters())


# ---------------------------------------------------------------------------------------------
# small shared pieces


def connector(in_ch: int, out_ch: int) -> nn.Sequential:
    """AttnFD's connector (docs/method.md "Loss"): 1×1 conv student → teacher channels (no bias) + BN."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))


def match_size(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of ``x`` to ``like``'s spatial size (no-op when equal)."""
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def as_float(x: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 (cached targets, autocast outputs) → float32; float32 / float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def paired_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) logits as float32, the student's resized to the teacher's size; a class-count or
    batch mismatch is refused naming both shapes."""
    t = as_float(teacher_logits)
    s = match_size(as_float(student_logits), t)
    if s.shape != t.shape:
        raise UserError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ")
    return s, t


def target_channels(ctx: MethodContext, name: str) -> int:
    if name not in ctx.target_shapes:
        raise KeyError(f"no shape for teacher target {name!r} (have {', '.join(ctx.target_shapes)})")
    return int(ctx.target_shapes[name][0])


def per_point(ctx: MethodContext, points: Sequence[str], build: Callable[[int, int], nn.Module],
              target: Callable[[str], str]) -> nn.ModuleDict:
    """One module per distillation point, ``build(student channels, teacher channels)``, the teacher's
    channels read from the shape of target ``target(point)`` (``raw_name`` for raw features)."""
    return nn.ModuleDict({p: build(ctx.student_channels[p], target_channels(ctx, target(p))) for p in points})


# ---------------------------------------------------------------------------------------------
# registry

_REGISTRY: dict[str, type[DistillMethod]] = {}
SEPARATOR = "+"


def register(cls: type[DistillMethod]) -> type[DistillMethod]:
    """Class decorator: make ``cls`` available as ``student.method = cls.name``, with its config section
    ``student.<name>`` (``params_type``, a ``MethodSection`` subclass of its own)."""
    if not cls.name or SEPARATOR in cls.name:
        raise UserError(f"method class {cls.__name__} needs a name without {SEPARATOR!r}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise UserError(f"method {cls.name!r} registered twice")
    section = cls.params_type
    if not (isinstance(section, type) and issubclass(section, MethodSection)) or section is MethodSection \
            or section.method not in ("", cls.name):
        raise UserError(f"method {cls.name!r}: params_type must be its own MethodSection dataclass, declared in "
                        f"its module (its config section student.{cls.name})")
    section.method = cls.name
    _REGISTRY[cls.name] = cls
    return cls


def method_sections() -> dict[str, type[MethodSection]]:
    """Config section class of every registered method, by name (registration order)."""
    return {name: cls.params_type for name, cls in _REGISTRY.items()}


def list_methods() -> list[str]:
    """Registered method names, in registration order."""
    return list(_REGISTRY)


def method_label(name: str) -> str:
    """Display name of method ``name`` (``label``, else the name itself for an unknown one)."""
    cls = _REGISTRY.get(name)
    return (cls.label or cls.name) if cls is not None else name


def get_method(name: str) -> type[DistillMethod]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown distillation method {name!r}; known: {', '.join(_REGISTRY)}") from None


def parse_methods(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"attnfd+kd"`` (or ``["attnfd", "kd"]``) → ``("attnfd", "kd")``. This is where ``student.method`` is
    validated: unknown, empty or repeated names raise a ConfigError naming the key and the known methods."""
    names = [n.strip() for n in (spec.split(SEPARATOR) if isinstance(spec, str) else spec)]
    if not names or any(not n for n in names):
        raise ConfigError(f"student.method: {spec!r}: expected names joined by {SEPARATOR!r}, e.g. 'attnfd+kd' "
                          f"(known: {', '.join(_REGISTRY)})")
    for n in names:
        if n not in _REGISTRY:
            raise ConfigError(f"student.method: unknown distillation method {n!r}; known: {', '.join(_REGISTRY)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"student.method: {spec!r}: a method repeats")
    return tuple(names)


def required_targets(spec: str | Sequence[str], points: Sequence[str],
                     params_of: Callable[[str], Any] | None = None) -> list[str]:
    """Union (in order) of the teacher targets the methods of ``spec`` read at ``points``; ``params_of(name)``
    gives a method's config section (``StudentConfig.method_params``; None = every section at its defaults)."""
    out: list[str] = []
    for n in parse_methods(spec):
        params = params_of(n) if params_of is not None else None
        for t in get_method(n).required_targets(tuple(points), params):
            if t not in out:
                out.append(t)
    return out


def build_methods(spec: str | Sequence[str], context_for: Callable[[str], MethodContext]) -> dict[str, DistillMethod]:
    """Instantiate every method of ``spec`` (in order) with its context."""
    return {n: get_method(n)(context_for(n)) for n in parse_methods(spec)}
