"""The distillation head of Stage 2: the module it trains (and checkpoints) — the student plus the
distillation methods' modules (CBAMs, connectors, projectors) —, the method weights, and the training task
``StudentTask`` (L = ce_weight(epoch) · CE + α · Σ_m w_m L_m).

``Distiller(student, points, teacher_channels)`` is AttnFD (docs/method.md "CBAM" and "Loss"): a trainable CBAM at each
distillation point, then a connector (1×1 conv student → teacher channels + BN), then bilinear resizing
to the teacher's map. ``Distiller(student, points, methods={...})`` holds any set of registered methods
(``attnfd_pipeline.losses``) — KD, LAD, AICSD, Af-DCD, CIRKD, DIST or a combination; ``methods={}`` is the
plain student.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attnfd_pipeline.cache.encoding import decode_item
from attnfd_pipeline.config import StudentConfig
from attnfd_pipeline.engine import distributed
from attnfd_pipeline.engine.optim import param_groups
from attnfd_pipeline.layers.cbam import ChannelGate
from attnfd_pipeline.losses import AttnFD, DistillMethod, MethodContext, build_methods, parse_methods, required_targets
from attnfd_pipeline.losses.base import connector, match_size
from attnfd_pipeline.models import build_model
from attnfd_pipeline.utils import seed_everything
from attnfd_pipeline.errors import UserError

__all__ = ["Distiller", "StudentRecipe", "StudentTask", "build_distiller", "build_task", "connector", "match_size",
           "method_settings", "method_targets", "method_weights"]

# the distillation point at the backbone's output: the released code holds its CBAM inside the backbone
BACKBONE_POINTS = ("B",)


@dataclasses.dataclass(frozen=True)
class StudentRecipe:
    """The recipe details where the paper's text and the released AttnFD code differ (config.StudentConfig,
    docs/method.md "Paper text and released code"); the defaults are the paper's reading."""

    ce_batch_average: bool = False  # CE / n
    cbam_trainable: str = "all"  # "conv_bn": the CBAM channel MLPs stay at their initialisation
    connector_schedule: str = "always"  # "warmup_only": connectors learn during the warm-up alone, at 1× lr
    cbam_lr: str = "head"  # "tap": the CBAM at a backbone point learns at the backbone lr

    @classmethod
    def from_config(cls, s: StudentConfig) -> "StudentRecipe":
        return cls(s.ce_batch_average, s.cbam_trainable, s.connector_schedule, s.cbam_lr)


class Distiller(nn.Module):
    def __init__(self, student: nn.Module, points: Sequence[str], teacher_channels: Mapping[str, int] | None = None,
                 *, methods: Mapping[str, DistillMethod] | None = None):
        super().__init__()
        self.student = student
        self.points = tuple(points)
        if methods is None:  # AttnFD, the default
            if teacher_channels is None:
                raise UserError("Distiller needs teacher_channels (AttnFD) or methods")
            ctx = MethodContext(self.points, {p: student.taps[p].channels for p in self.points},
                                {p: (int(teacher_channels[p]), 0, 0) for p in self.points})
            methods = {"attnfd": AttnFD(ctx)}
        self.methods = nn.ModuleDict(dict(methods))

    # -- AttnFD's modules, under the names checkpoints and the visualiser use -----------------------
    def _attnfd(self) -> AttnFD:
        if "attnfd" not in self.methods:
            raise AttributeError(f"this distiller has no attnfd method (methods: {list(self.methods)})")
        return self.methods["attnfd"]

    @property
    def attention(self) -> nn.ModuleDict:
        return self._attnfd().attention

    @property
    def connectors(self) -> nn.ModuleDict:
        return self._attnfd().connectors

    def refine(self, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Student F'' at each point, passed through its connector (teacher channels) — AttnFD."""
        return self._attnfd().refine(feats)

    # -- what the methods need and do ---------------------------------------------------------------
    def required_targets(self) -> list[str]:
        """Union (in order) of the teacher targets the methods read."""
        out: list[str] = []
        for m in self.methods.values():
            out += [t for t in m.targets() if t not in out]
        return out

    def ce_weight(self, epoch: int) -> float:
        w = 1.0
        for m in self.methods.values():
            w *= m.ce_weight(epoch)
        return w

    def backbone_parameters(self):
        return self.student.backbone_parameters()

    def head_parameters(self):
        """Student head + every method's modules (CBAMs with their MLPs, connectors, projectors)."""
        yield from self.student.head_parameters()
        yield from self.methods.parameters()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.student(x)


class StudentTask:
    """L = ce_weight(epoch) · CE + α · Σ_m w_m · L_m over the distiller's methods (AttnFD by default).

    ``norm`` (when given) is set on the methods that normalise features (attnfd, lad); ``weights`` maps
    method names to w_m (default 1). With ``teacher`` the targets are computed online every step."""

    def __init__(self, distiller: Distiller, *, alpha: float, norm: str | None = None, warmup_epochs: int = 0,
                 teacher=None, weights: dict[str, float] | None = None, recipe: StudentRecipe = StudentRecipe()):
        self.distiller = self.modules = distiller
        self.recipe = recipe
        if recipe.cbam_trainable == "conv_bn":  # in no optimiser group, and no gradient is kept for them
            for m in distiller.modules():
                if isinstance(m, ChannelGate):
                    m.mlp.requires_grad_(False)
        self.deploy_model = distiller.student  # best.pt also stores it alone (what evaluate / export load)
        self.alpha, self.warmup_epochs, self.teacher = alpha, warmup_epochs, teacher
        self.norm = norm
        if norm is not None:
            for m in distiller.methods.values():
                if hasattr(m, "norm"):
                    m.norm = norm
        unknown = sorted(set(weights or {}) - set(distiller.methods))
        if unknown:
            raise UserError(f"weights for methods {unknown} that are not in use ({list(distiller.methods)})")
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in distiller.methods}
        self.target_names = distiller.required_targets()

    def _connectors(self) -> list[torch.nn.Parameter]:
        """AttnFD's connector parameters when they learn on their own schedule (``warmup_only``), else none."""
        if self.recipe.connector_schedule != "warmup_only" or "attnfd" not in self.distiller.methods:
            return []
        return list(self.distiller.methods["attnfd"].connectors.parameters())

    def _tap_cbams(self) -> list[torch.nn.Parameter]:
        """The CBAM parameters of backbone points when CBAMs learn at their tap's lr (``cbam_lr = "tap"``)."""
        if self.recipe.cbam_lr != "tap" or "attnfd" not in self.distiller.methods:
            return []
        attention = self.distiller.methods["attnfd"].attention
        return [q for p in BACKBONE_POINTS if p in attention for q in attention[p].parameters()]

    def param_groups(self, cfg):
        """Backbone (lr) and head (lr × head_lr_mult) groups; under ``warmup_only`` a third group, the
        connectors at lr, which only the warm-up epochs step (``on_epoch_start`` freezes them after)."""
        connectors, tap = self._connectors(), self._tap_cbams()
        apart = {id(p) for p in connectors + tap}
        head = (p for p in self.distiller.head_parameters() if id(p) not in apart)
        groups = param_groups([*self.distiller.backbone_parameters(), *tap], head, cfg)
        if connectors:  # every connector parameter, frozen or not, so a resumed run builds the same groups
            groups.append({"params": connectors, "lr": cfg.lr, "name": "connectors"})
        return groups

    def _targets(self, batch) -> dict[str, torch.Tensor]:
        if self.teacher is not None:
            return self.teacher.targets(batch["image"], self.target_names)
        # cached targets arrive as stored (float16, or int8 codes + scale/offset): decoded here, on the
        # student's device, once per batch
        return {n: decode_item(v) for n, v in batch["targets"].items()}

    def distill_terms(self, out, targets, epoch: int = 0, batch=None, *, warmup: bool = False):
        """Σ_m w_m L_m and the logs (each method's loss and its own sub-terms)."""
        total, logs = None, {}
        for name, method in self.distiller.methods.items():
            if warmup and not method.has_parameters():
                continue  # nothing of this method learns while the student is frozen
            fn = method.warmup_loss if warmup else method
            loss, sub = fn(out, targets, epoch, batch)
            w = self.weights[name]
            total = w * loss if total is None else total + w * loss
            logs[name] = float(loss.detach())
            logs.update({f"{name}_{k}": v for k, v in sub.items()})
        return total, logs

    def distill_loss(self, feats, targets, epoch: int = 0, batch=None) -> torch.Tensor:
        """The weighted distillation loss Σ_m w_m L_m (a tensor)."""
        loss, _ = self.distill_terms(feats, targets, epoch, batch)
        return loss if loss is not None else torch.zeros((), device=feats["out"].device)

    def train_step(self, batch, epoch):
        learnable = any(m.has_parameters() for m in self.distiller.methods.values())
        if self.alpha > 0 and epoch < self.warmup_epochs and learnable:
            # connector warm-up (reference): only the methods' modules learn, from frozen student features
            with torch.no_grad():
                out = self.distiller(batch["image"])
            loss, logs = self.distill_terms(out, self._targets(batch), epoch, batch, warmup=True)
            return self.alpha * loss, {"distill": float(loss.detach()), **logs}
        out = self.distiller(batch["image"])
        ce = F.cross_entropy(out["out"].float(), batch["label"], ignore_index=255)
        seg = ce / self.ce_divisor(out["out"].shape[0])
        if self.alpha == 0 or not self.distiller.methods:
            return seg, {"ce": float(ce.detach())}
        dl, logs = self.distill_terms(out, self._targets(batch), epoch, batch)
        cw = self.distiller.ce_weight(epoch)
        loss = seg if cw == 1.0 else cw * seg
        return loss + self.alpha * dl, {"ce": float(ce.detach()), "distill": float(dl.detach()), **logs}

    @property
    def clips_gradients(self) -> bool:
        """Whether a method clips its modules' gradients (``DistillMethod.grad_clip``, e.g. Af-DCD's 15)."""
        return self.alpha > 0 and any(m.grad_clip() > 0 for m in self.distiller.methods.values())

    def clip_gradients(self) -> None:
        """Clip each method's module gradients at its own norm, after backward and before the step."""
        for m in self.distiller.methods.values():
            if m.grad_clip() > 0:
                torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=m.grad_clip(), norm_type=2)

    def predict(self, images):
        return self.distiller(images)["out"]

    def ce_divisor(self, n: int) -> int:
        """What the mean CE is divided by: the step's batch over every rank under ``ce_batch_average``
        (the released code's n: its DataParallel loss sees the whole batch), else 1."""
        return n * distributed.world_size() if self.recipe.ce_batch_average else 1

    def on_epoch_start(self, epoch):
        """Under ``warmup_only`` the connectors learn in the warm-up epochs only: after them they keep no
        gradient, so their optimiser group skips them (no step, no weight decay) — frozen, as in no optimiser."""
        learns = epoch < self.warmup_epochs
        for p in self._connectors():
            p.requires_grad_(learns)


def method_weights(s: StudentConfig) -> dict[str, float]:
    """w_m (the factor on α) of every method of ``student.method``: ``StudentConfig.method_weight``."""
    return {n: s.method_weight(n) for n in parse_methods(s.method)}


def method_settings(s: StudentConfig) -> dict[str, dict]:
    """The config sections of the methods in use (what a run's result records)."""
    out = {}
    for n in parse_methods(s.method):
        params = s.method_params(n)
        out[n] = dataclasses.asdict(params) if params is not None else {}
    return out


def method_targets(s: StudentConfig) -> list[str]:
    """Teacher targets the configured methods read at ``student.points``."""
    return required_targets(s.method, s.points, s.method_params)


def build_distiller(student: torch.nn.Module, s: StudentConfig, target_shapes: dict[str, tuple[int, int, int]],
                    num_classes: int, *, distill: bool = True,
                    target_pool: dict[str, tuple[int, int, int]] | None = None) -> Distiller:
    """The student wrapped with the modules of the methods of ``student.method`` (none when ``distill``
    is false: the plain student). ``target_shapes``: (C, H, W) of each teacher target they read;
    ``target_pool``: (factor, full H, full W) of the targets the cache stores pooled."""
    if not distill:
        return Distiller(student, s.points, methods={})

    def context(name: str) -> MethodContext:
        return MethodContext(points=tuple(s.points), student_channels={p: t.channels for p, t in student.taps.items()},
                             target_shapes=target_shapes, num_classes=num_classes, epochs=s.train.epochs,
                             norm=s.norm, params=s.method_params(name), target_pool=dict(target_pool or {}))

    return Distiller(student, s.points, methods=build_methods(s.method, context))


def build_task(s: StudentConfig, num_classes: int, target_shapes: dict[str, tuple[int, int, int]], *,
               alpha: float | None = None, teacher=None, target_pool: dict[str, tuple[int, int, int]] | None = None,
               device: torch.device | None = None, warmup_epochs: int | None = None) -> StudentTask:
    """The student (seeded by ``student.train.seed``) with its distillation modules and the task that trains
    them at ``alpha`` (default ``student.alpha``; 0 = the plain student); ``teacher`` computes the targets
    online, else the batches carry them. ``warmup_epochs``: connector warm-up (default
    ``student.connector_warmup_epochs``)."""
    alpha = s.alpha if alpha is None else alpha
    warmup_epochs = s.connector_warmup_epochs if warmup_epochs is None else warmup_epochs
    seed_everything(s.train.seed)
    student = build_model(s.model.name, num_classes, output_stride=s.model.output_stride,
                          backbone_weights=s.model.backbone_weights or None)
    # Distillation modules draw their init from a forked RNG: the student's init and its dropout
    # stream are the plain student's, so α = 0 is exactly the baseline run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.train.seed + 1)
        distiller = build_distiller(student, s, target_shapes, num_classes, distill=alpha > 0,
                                    target_pool=target_pool)
    if device is not None:
        distiller = distiller.to(device)
    return StudentTask(distiller, alpha=alpha, norm=s.norm, warmup_epochs=warmup_epochs, teacher=teacher,
                       weights=method_weights(s) if alpha > 0 else None, recipe=StudentRecipe.from_config(s))
