"""Stage 1a: train the teacher, fit its CBAMs (docs/method.md "Teacher CBAM modes"), freeze both into one
self-describing bundle.

Teacher CBAM modes:
- ``inpath`` (default): CBAM sits in the teacher's forward path at each point while the teacher
  trains with CE (the authors: "generally achieves better performance"), then everything is frozen.
- ``fitted``: the teacher trains (or is imported) without CBAM; then, with it frozen in eval mode,
  side-branch CBAMs are fitted with an auxiliary 1×1 classifier + CE on each refined map F''.
- ``parameter_free``: channel gate sigmoid(avg+max), spatial gate sigmoid(max+mean), no weights.
- ``untrained``: side-branch CBAMs that keep their (seeded) initial weights — what the released
  reference code effectively does.

The bundle (``teacher_bundle.pt`` + a ``teacher_bundle.json`` sidecar with everything but the
weights) is what Stage 1b fingerprints; Stage 2 reads only the sidecar and never builds the teacher. Both
carry the bundle's format version; ``BUNDLE.migrate`` brings an older one to the current shape.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import attnfd_pipeline
from attnfd_pipeline.config import Config
from attnfd_pipeline.engine.optim import param_groups
from attnfd_pipeline.formats import SavedFormat
from attnfd_pipeline.layers import build_attention
from attnfd_pipeline.models import build_model
from attnfd_pipeline.safe_load import load_torch_file, to_plain
from attnfd_pipeline.targets import LOGITS, is_raw, target_names, target_point
from attnfd_pipeline.utils import atomic_torch_save, atomic_write_bytes, atomic_write_json, sha256_state_dict
from attnfd_pipeline.errors import UserError

BUNDLE_FORMATS = ("attnfd-teacher-bundle/1", "attnfd-teacher-bundle/2")
BUNDLE_FORMAT = BUNDLE_FORMATS[-1]
BUNDLE_NAME = "teacher_bundle.pt"


def _v1_to_v2(d: dict, **_) -> dict:
    """A /2 sidecar always records ``file_sha256``, the SHA-256 of the ``.pt``'s bytes, checked before they are
    deserialised. The first /1 bundles recorded none: theirs is None, so their ``.pt`` is read weights-only
    without that check, and its weights hash (checked on every bundle after loading) is what vouches for it."""
    d.setdefault("file_sha256", None)
    return d


BUNDLE = SavedFormat("teacher bundle", BUNDLE_FORMATS, {BUNDLE_FORMATS[0]: _v1_to_v2})


def _migrated(d, where: str) -> dict:
    """``d`` (a sidecar or the ``.pt``'s state) at the current bundle format; refused naming ``where`` when it
    is not a teacher bundle or one of a version this release does not read."""
    if not isinstance(d, dict) or not str(d.get("format", "")).startswith("attnfd-teacher-bundle/"):
        raise UserError(f"{where}: not a teacher bundle (format {d.get('format') if isinstance(d, dict) else None!r})")
    return BUNDLE.migrate(d, where)


def bundle_path(cfg: Config) -> Path:
    return cfg.teacher_dir / BUNDLE_NAME


def build_teacher_model(cfg: Config, num_classes: int) -> nn.Module:
    t = cfg.teacher
    return build_model(t.model.name, num_classes, output_stride=t.model.output_stride,
                       backbone_weights=t.model.backbone_weights or None,
                       inpath_attention=t.points if t.cbam_mode == "inpath" else None)


def build_side_attention(cfg: Config, model: nn.Module) -> nn.ModuleDict | None:
    """Side-branch attention for the non-inpath modes (seeded, so ``untrained`` is reproducible)."""
    mode = cfg.teacher.cbam_mode
    if mode == "inpath":
        return None
    kind = "parameter_free" if mode == "parameter_free" else "cbam"
    with torch.random.fork_rng():
        torch.manual_seed(cfg.teacher.train.seed)
        return nn.ModuleDict({p: build_attention(kind, model.taps[p].channels) for p in cfg.teacher.points})


class SegTask:
    """Plain supervised segmentation: CE (ignore 255) on the model's "out"."""

    def __init__(self, model: nn.Module):
        self.model = self.modules = model

    def param_groups(self, cfg):
        return param_groups(self.model.backbone_parameters(), self.model.head_parameters(), cfg)

    def train_step(self, batch, epoch):
        out = self.model(batch["image"])["out"]
        return F.cross_entropy(out.float(), batch["label"], ignore_index=255), {}

    def predict(self, images):
        return self.model(images)["out"]

    def on_epoch_start(self, epoch):
        pass


class CBAMFitTask:
    """``fitted`` mode: the frozen teacher feeds side-branch CBAMs, each followed by an auxiliary 1×1
    classifier; CE on every point's prediction trains the CBAMs to keep class evidence."""

    def __init__(self, teacher_model: nn.Module, attention: nn.ModuleDict, num_classes: int):
        self.teacher = teacher_model.eval().requires_grad_(False)
        aux = nn.ModuleDict({p: nn.Conv2d(teacher_model.taps[p].channels, num_classes, 1) for p in attention})
        self.modules = nn.ModuleDict({"attention": attention, "aux": aux})

    def param_groups(self, cfg):
        return [{"params": list(self.modules.parameters()), "lr": cfg.lr, "name": "cbam"}]

    def _logits(self, images):
        with torch.no_grad():
            self.teacher.eval()
            feats = self.teacher(images)
        size = images.shape[-2:]
        out = {}
        for p, att in self.modules["attention"].items():
            logits = self.modules["aux"][p](att(feats[p]))
            out[p] = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
        return out

    def train_step(self, batch, epoch):
        logits = self._logits(batch["image"])
        losses = {p: F.cross_entropy(v.float(), batch["label"], ignore_index=255) for p, v in logits.items()}
        return sum(losses.values()), {f"ce_{p}": float(v.detach()) for p, v in losses.items()}

    def predict(self, images):
        return sum(v.softmax(1) for v in self._logits(images).values())

    def on_epoch_start(self, epoch):
        self.teacher.eval()


class FrozenTeacher(nn.Module):
    """The frozen teacher + its CBAMs. Stays in eval mode whatever ``train()`` is called with, has no
    trainable parameters, and computes targets under ``no_grad``: a target depends only on (weights,
    image, augmentation), never on the batch it was computed in."""

    def __init__(self, model: nn.Module, attention: nn.ModuleDict | None, mode: str, points: Sequence[str],
                 info: dict, path: Path | None = None):
        super().__init__()
        self.path = path  # the bundle it was loaded from, for messages
        self.model = model
        self.attention = attention
        self.mode = mode
        self.points = tuple(points)
        self._info = dict(info)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):  # noqa: D401 - frozen by construction
        return super().train(False)

    @property
    def sha256(self) -> str:
        return self._info["sha256"]

    def info(self) -> dict:
        return dict(self._info)

    @property
    def num_classes(self) -> int:
        return self._info["num_classes"]

    def target_names(self, points: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
        return target_names(points, extra)

    @torch.no_grad()
    def targets(self, x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        out = self.model(x)
        result = {}
        for name in names:
            if name == LOGITS:
                result[name] = out[LOGITS].float()
            elif is_raw(name):
                result[name] = out[target_point(name)].float()
            elif name in self.points:
                if self.attention is None:
                    result[name] = out[f"{name}_refined"].float()
                else:
                    result[name] = self.attention[name](out[name]).float()
            else:
                raise KeyError(f"teacher has no target {name!r} (points {self.points}, plus logits, raw_*)")
        return result

    @torch.no_grad()
    def target_specs(self, crop_hw: Sequence[int], names: Sequence[str]) -> dict[str, tuple[int, int, int]]:
        """(C, H, W) of each target for a crop of ``crop_hw`` (one dry forward on zeros)."""
        device = next(self.model.parameters()).device
        t = self.targets(torch.zeros(1, 3, *crop_hw, device=device), names)
        return {k: tuple(v.shape[1:]) for k, v in t.items()}

    def forward(self, x):
        return self.model(x)


def _weights_sha(model: nn.Module, attention: nn.ModuleDict | None, mode: str) -> str:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    if attention is not None:
        state.update({f"attention.{k}": v for k, v in attention.state_dict().items()})
    state["cbam_mode"] = mode
    return sha256_state_dict(state)


def save_bundle(path: str | Path, cfg: Config, model: nn.Module, attention: nn.ModuleDict | None, num_classes: int,
                metrics: dict | None = None, source: dict | None = None) -> Path:
    """Write ``teacher_bundle.pt`` and its JSON sidecar. The sidecar also records ``file_sha256``, the hash
    of the ``.pt`` bytes, which :func:`load_teacher` checks before deserialising; ``source`` (an imported
    teacher: its file's SHA-256, format and key mapping) is recorded in both."""
    path = Path(path)
    t = cfg.teacher
    info = {
        "format": BUNDLE_FORMAT,
        "model": t.model.name,
        "output_stride": t.model.output_stride,
        "num_classes": num_classes,
        "cbam_mode": t.cbam_mode,
        "points": list(t.points),
        "sha256": _weights_sha(model, attention, t.cbam_mode),
        "package_version": attnfd_pipeline.__version__,
        "metrics": to_plain({k: v for k, v in (metrics or {}).items() if k != "confusion"}),
        "config": cfg.to_dict(),
        **({"source": source} if source is not None else {}),
    }
    state = {**info, "model_state": model.state_dict(),
             "attention_state": attention.state_dict() if attention is not None else None}
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_json(path.with_suffix(".json"), {**info, "file_sha256": hashlib.sha256(buf.getvalue()).hexdigest()})
    return path


def load_teacher_info(path: str | Path) -> dict:
    """The bundle's metadata (sha256, model, mode, points, ``file_sha256``…) from its JSON sidecar, at the
    current format — no weights."""
    path = Path(path)
    side = path.with_suffix(".json")
    if not side.is_file():
        raise FileNotFoundError(f"{side}: teacher bundle metadata not found (train it with `attnfd teacher -c CONFIG` first)")
    try:
        info = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{side}: unreadable teacher bundle metadata ({e})") from None
    info = _migrated(info, str(side))
    if not isinstance(info.get("file_sha256", 0), (str, type(None))):
        raise UserError(f"{side}: key 'file_sha256' is missing or not a SHA-256")
    return info


def load_teacher(path: str | Path, device: torch.device | str = "cpu") -> FrozenTeacher:
    """Rebuild the frozen teacher from its bundle: the file's bytes must match the sidecar's SHA-256
    before they are deserialised (weights-only), and the weights' hash must match the recorded one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: teacher bundle not found (train it with `attnfd teacher -c CONFIG` first)")
    from attnfd_pipeline.engine.checkpoint import load_modules

    side = path.with_suffix(".json")
    if not side.is_file():
        raise UserError(f"{side}: not found beside {path.name}. A teacher bundle is read with its sidecar, which "
                        f"records the SHA-256 the .pt's bytes are checked against before they are deserialised: "
                        f"copy it along, or import the .pt alone as a new bundle (`attnfd teacher import {path}`)")
    state, _ = load_torch_file(path, what="teacher bundle", expected_sha256=load_teacher_info(path)["file_sha256"],
                               sha_source=str(side))
    state = _migrated(state, str(path))
    model = build_model(state["model"], state["num_classes"], output_stride=state["output_stride"],
                        inpath_attention=state["points"] if state["cbam_mode"] == "inpath" else None)
    load_modules(model, state["model_state"], path)  # a clear error naming the file if it does not fit
    attention = None
    if state["attention_state"] is not None:
        kind = "parameter_free" if state["cbam_mode"] == "parameter_free" else "cbam"
        attention = nn.ModuleDict({p: build_attention(kind, model.taps[p].channels) for p in state["points"]})
        load_modules(attention, state["attention_state"], path)
    sha = _weights_sha(model, attention, state["cbam_mode"])
    if sha != state["sha256"]:
        raise UserError(f"{path}: weights hash {sha[:12]} does not match the recorded {state['sha256'][:12]} "
                         f"(file modified or corrupt)")
    info = {k: state[k] for k in ("model", "output_stride", "num_classes", "cbam_mode", "points", "sha256",
                                  "package_version")}
    return FrozenTeacher(model, attention, state["cbam_mode"], state["points"], info, path).to(device)


def export_state_dict(bundle: str | Path, out: str | Path) -> Path:
    """Write the bundle's network (in-path CBAMs included, side-branch CBAMs not) as a plain state dict
    of tensors: the ``state_dict`` format ``attnfd teacher import`` reads."""
    teacher = load_teacher(bundle)
    return atomic_torch_save(teacher.model.state_dict(), out)
