"""Reading a trained teacher from a file this project did not write (``attnfd teacher import``).

Formats:
- ``reference``: the checkpoints of the AttnFD / AICSD reference code (the ``DeepLab`` of the
  pytorch-deeplab-xception lineage): ``{"state_dict": …, "epoch", "best_pred", "optimizer"}``, keys possibly
  ``module.``-prefixed. Its ResNet uses torchvision's names under ``backbone.``; its blocks apply the ReLU at
  their input instead of their output, which composes to the same network as torchvision's (the stage
  output that feeds the head is ReLU'd in both, and layer4's raw output — tap B — is pre-ReLU in both).
  Heads are renamed by :data:`REFERENCE_KEY_MAP`. ``*.cbam.*`` keys are the reference's side-branch CBAMs
  at B (``backbone.cbam``), E (``aspp.cbam``) and D (``decoder.cbam``), whose channel MLP is ``Linear``
  layers (here 1×1 convolutions).
- ``state_dict`` (alias ``torchvision``): a plain state dict of this project's model (torchvision-layout
  backbone + this project's head), e.g. exported with ``attnfd teacher export``; also read from the
  ``modules`` of an attnfd checkpoint or the ``model_state`` of a teacher bundle. ``attention.<P>.*`` keys
  are in-path CBAMs: such a network is imported in ``inpath`` mode (its CBAMs are part of its forward).

Files are read with :func:`attnfd_pipeline.safe_load.load_torch_file` (weights-only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnfd_pipeline.targets import POINTS
from attnfd_pipeline.safe_load import load_torch_file, state_mismatch
from attnfd_pipeline.errors import UserError

__all__ = ["FORMATS", "IMPORT_CBAM_MODES", "REFERENCE_CBAM_MAP", "REFERENCE_KEY_MAP", "REFERENCE_MODELS",
           "TeacherWeights", "check_state_fits", "map_reference", "read_teacher_file"]

FORMATS = ("auto", "reference", "torchvision", "state_dict")
IMPORT_CBAM_MODES = ("fitted", "parameter_free", "untrained")
# models whose forward equals the reference's: ResNet-101 with multi-grid layer4, and the BasicBlock ResNets
REFERENCE_MODELS = ("deeplabv3plus_resnet101", "deeplabv3plus_resnet34", "deeplabv3plus_resnet18")

# (reference prefix, this project's prefix), first match wins; the CBAM rules come before "backbone."
REFERENCE_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("backbone.cbam.", "attention.B."),
    ("aspp.cbam.", "attention.E."),
    ("decoder.cbam.", "attention.D."),
    ("backbone.", "backbone."),
    *((f"aspp.aspp{i + 1}.atrous_conv.", f"aspp.branches.{i}.0.") for i in range(4)),
    *((f"aspp.aspp{i + 1}.bn.", f"aspp.branches.{i}.1.") for i in range(4)),
    ("aspp.global_avg_pool.1.", "aspp.image_pool.1."),
    ("aspp.global_avg_pool.2.", "aspp.image_pool.2."),
    ("aspp.conv1.", "aspp.project.0."),
    ("aspp.bn1.", "aspp.project.1."),
    ("decoder.conv1.", "decoder.reduce.0."),
    ("decoder.bn1.", "decoder.reduce.1."),
    ("decoder.last_conv.0.", "decoder.conv1.0."),
    ("decoder.last_conv.1.", "decoder.conv1.1."),
    ("decoder.last_conv.4.", "decoder.conv2.0."),
    ("decoder.last_conv.5.", "decoder.conv2.1."),
    ("decoder.last_conv.8.", "classifier."),
)
# inside one CBAM: the reference's Linear MLP (Flatten at index 0) → 1×1 convs; BasicConv → conv + bn
REFERENCE_CBAM_MAP: tuple[tuple[str, str], ...] = (
    ("ChannelGate.mlp.1.", "channel_gate.mlp.0."),
    ("ChannelGate.mlp.3.", "channel_gate.mlp.2."),
    ("SpatialGate.spatial.conv.", "spatial_gate.conv."),
    ("SpatialGate.spatial.bn.", "spatial_gate.bn."),
)
_ATTENTION = re.compile(r"^attention\.([A-Z])\.")


@dataclass
class TeacherWeights:
    """A teacher read from a file: the model's state dict in this project's names, the CBAM states by
    point (reference ``*.cbam.*``, or in-path ``attention.<P>.*``), and what the bundle records."""

    model_state: dict[str, torch.Tensor]
    cbam_state: dict[str, dict[str, torch.Tensor]]
    format: str
    sha256: str
    key_map: list[list[str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # top-level entries not read (optimizer, epoch …)

    @property
    def inpath_points(self) -> tuple[str, ...]:
        if self.format == "reference":
            return ()
        return tuple(p for p in POINTS if p in self.cbam_state) + tuple(sorted(set(self.cbam_state) - set(POINTS)))

    def file_key(self, key: str) -> str:
        """``key`` (this project's name) as the imported file spells it: the reference's name under its
        layout (``aspp.project.0.weight`` → ``aspp.conv1.weight``), with the ``module.`` prefix the file has."""
        prefix = "module." if self.key_map and self.key_map[0] == ["module.", ""] else ""
        if self.format != "reference":
            return prefix + key
        m = _ATTENTION.match(key)
        if m:  # a CBAM key: the reference's side CBAM of that point
            outer = _rename(f"attention.{m.group(1)}.", [(d, s) for s, d in REFERENCE_KEY_MAP])
            inner = _rename(key[m.end():], [(d, s) for s, d in REFERENCE_CBAM_MAP])
            if outer is not None and inner is not None:
                return prefix + outer + inner
            return prefix + key
        # a key the map does not cover is kept under the file's own name (map_reference)
        return prefix + (_rename(key, [(d, s) for s, d in REFERENCE_KEY_MAP if not d.startswith("attention.")]) or key)

    def shown_key(self, key: str) -> str:
        """``key`` for a message: the file's name, with this project's beside it where they differ."""
        theirs = self.file_key(key)
        return theirs if theirs == key else f"{theirs} (here {key})"

    def source(self, path: str | Path) -> dict[str, Any]:
        return {"path": str(path), "sha256": self.sha256, "format": self.format, "key_map": self.key_map,
                "ignored_entries": self.ignored}


def _state_dict_of(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of a loaded file and the names of the top-level entries that were not read."""
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a teacher checkpoint (a {type(obj).__name__}, expected a dict of tensors "
                         f"or a dict with 'state_dict')")
    for key in ("state_dict", "model_state", "modules"):
        if isinstance(obj.get(key), dict):
            return obj[key], sorted(k for k in obj if k != key)
    return obj, []


def _strip_module(state: dict[str, Any]) -> dict[str, Any]:
    """Drop the ``module.`` prefix that (Distributed)DataParallel adds to every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _detect(state: dict[str, Any], path: Path) -> str:
    keys = list(state)
    if any(k.startswith(("aspp.aspp1.", "decoder.last_conv.")) for k in keys):
        return "reference"
    if any(k.startswith(("aspp.branches.", "decoder.reduce.")) for k in keys):
        return "state_dict"
    shown = ", ".join(keys[:5]) or "no keys"
    raise UserError(f"{path}: cannot tell the checkpoint's format (keys {shown}): neither the reference layout "
                     f"(aspp.aspp1.*, decoder.last_conv.*) nor this project's (aspp.branches.*, decoder.reduce.*); "
                     f"pass --format reference|state_dict")


def read_teacher_file(path: str | Path, fmt: str = "auto") -> TeacherWeights:
    """Load ``path`` weights-only and bring it into this project's names (``fmt`` auto-detects)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    obj, sha = load_torch_file(path, what="teacher checkpoint")
    raw, ignored = _state_dict_of(obj, path)
    state = _strip_module(raw)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path}: not a state dict of tensors ({', '.join(map(str, bad[:3]))} are not tensors)")
    detected = _detect(state, path)
    if fmt == "auto":
        fmt = detected
    elif (fmt == "reference") != (detected == "reference"):
        raise UserError(f"{path}: --format {fmt} but the keys are in the {detected} layout")
    if fmt == "reference":
        model_state, cbam = map_reference(state)
        key_map = [list(rule) for rule in REFERENCE_KEY_MAP] + [["<cbam>." + a, "<cbam>." + b]
                                                              for a, b in REFERENCE_CBAM_MAP]
    else:
        model_state = {k: v for k, v in state.items() if not _ATTENTION.match(k)}
        cbam = {}
        for k, v in state.items():
            if m := _ATTENTION.match(k):
                cbam.setdefault(m.group(1), {})[k[m.end():]] = v
        key_map = [["", ""]]  # identity
    if state is not raw:
        key_map.insert(0, ["module.", ""])
    return TeacherWeights(model_state, cbam, fmt, sha, key_map, ignored)


def _rename(key: str, rules) -> str | None:
    for src, dst in rules:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def map_reference(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Reference names → ``(model_state, {point: cbam_state})``. A key no rule covers is kept under its
    own name, so the fit check reports it as unexpected."""
    model_state: dict[str, torch.Tensor] = {}
    cbam: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        new = _rename(key, REFERENCE_KEY_MAP) or key
        m = _ATTENTION.match(new)
        if not m:
            model_state[new] = value
            continue
        inner = _rename(new[m.end():], REFERENCE_CBAM_MAP)
        if inner is None:
            model_state[key] = value  # unknown CBAM part: reported as unexpected
            continue
        if inner.startswith("channel_gate.mlp.") and inner.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]  # Linear (out, in) → 1×1 conv (out, in, 1, 1)
        cbam.setdefault(m.group(1), {})[inner] = value
    return model_state, cbam


def check_state_fits(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path, what: str,
                     name=lambda key: key) -> dict:
    """``state`` completed with ``module``'s own ``num_batches_tracked`` buffers where absent (files from
    older PyTorch lack them); otherwise any missing, unexpected or mis-shaped key raises ONE ``ValueError``
    listing all three kinds, naming ``path`` and ``what`` was expected; ``name`` shows each key (the file's
    layout: ``TeacherWeights.shown_key``)."""
    own = module.state_dict()
    state = dict(state)
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = v
    problems = state_mismatch(own, state, shown=8, name=name)
    if problems:
        raise UserError(f"{path}: does not fit {what} — {'; '.join(problems)}")
    return state
