"""Checkpoints that describe themselves and are written atomically (temp file + fsync + rename).

Each checkpoint holds tensors and plain Python values only (RNG states as tensors, metrics without NumPy
objects), so it loads with ``torch.load(weights_only=True)``; a ``<name>.sha256`` sidecar records the
SHA-256 of its bytes, checked before the file is deserialised (``attnfd_pipeline.safe_load``); the pair is
committed in an order that a kill at any moment leaves readable (``save_hashed``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from attnfd_pipeline.config import LEGACY_SEED_ORDER, DataConfig, from_dict
from attnfd_pipeline.formats import SavedFormat
from attnfd_pipeline.safe_load import (load_torch_file, read_sha256s, sidecar_path, state_mismatch, to_plain,
                                      write_sha256)
from attnfd_pipeline.utils import deferred_interrupts, publish, sha256_file, write_temp
from attnfd_pipeline.errors import UserError

FORMATS = ("attnfd-checkpoint/1", "attnfd-checkpoint/2")
FORMAT = FORMATS[-1]


def _v1_to_v2(d: dict, file: str) -> dict:
    """attnfd-checkpoint/2 always holds ``model_state`` (the plain student, None for a teacher), its RNG
    states as tensors and, for a student, the cached-seed order it followed and ``extra.model_spec`` (what
    rebuilds the plain student). A /1 checkpoint may predate each: its student weights are then its
    ``student.*`` modules, its Python and NumPy RNG states the raw ``getstate()`` tuples, its order
    ``random``, and its model spec the student model and dataset of its recorded config."""
    student = {k[len("student."):]: v for k, v in d.get("modules", {}).items() if k.startswith("student.")}
    if d.get("model_state") is None:
        d["model_state"] = student or None
    rng = dict(d.get("rng") or {})
    if "python" in rng and not isinstance(rng["python"][1], torch.Tensor):
        version, internal, gauss = rng["python"]
        rng["python"] = [version, torch.tensor(internal, dtype=torch.int64), gauss]
    if "numpy" in rng and not isinstance(rng["numpy"], dict):
        name, key, pos, has_gauss, cached = rng["numpy"]
        rng["numpy"] = {"name": name, "key": torch.as_tensor(key).to(torch.int64), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    d["rng"] = rng
    extra = dict(d.get("extra") or {})
    if student:
        extra.setdefault("seed_order", LEGACY_SEED_ORDER)
    if d["model_state"] and "model_spec" not in extra:
        extra["model_spec"] = _model_spec_of(d.get("config") or {}, file)
    d["extra"] = extra
    return d


def _model_spec_of(cfg: dict, where: str) -> dict:
    """``runs.student.model_spec`` of a recorded config (a /1 student checkpoint's)."""
    try:
        m, dataset = cfg["student"]["model"], cfg["data"]["dataset"]
        nc = cfg.get("num_classes") or from_dict(DataConfig, cfg["data"], "data").num_classes
        return {"name": m["name"], "num_classes": nc, "output_stride": m["output_stride"], "dataset": dataset}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: the checkpoint does not say which student it holds ({e})") from None


CHECKPOINT = SavedFormat("checkpoint", FORMATS, {FORMATS[0]: _v1_to_v2})


def save_checkpoint(path: str | Path, *, modules: torch.nn.Module, optimizer, scheduler, scaler, epoch: int,
                    step: int, best: float, rng: dict, config: dict, extra: dict | None = None,
                    model: torch.nn.Module | None = None) -> Path:
    """``epoch`` is the number of finished epochs: resume continues at epoch ``epoch``. ``optimizer`` and
    ``scheduler`` None: a weights-only checkpoint (``best.pt``: evaluation and export need no optimizer
    state, which is as large as the model under SGD momentum). ``model``: the plain network inside
    ``modules`` (the student without distillation heads), stored as ``model_state``; its tensors are
    ``modules``' own, which ``torch.save`` writes once."""
    state = {
        "format": FORMAT,
        "modules": modules.state_dict(),
        "model_state": model.state_dict() if model is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "step": step,
        "best": best,
        "rng": to_plain(rng),
        "config": to_plain(config),
        "extra": to_plain(extra or {}),
    }
    return save_hashed(state, path)


def save_hashed(obj: Any, path: str | Path) -> Path:
    """``torch.save`` atomically with the SHA-256 of its bytes in ``<path>.sha256``, committed so that a kill
    (SIGKILL, power loss) at any moment leaves a pair a reader accepts:

    1. the bytes go to a temp file (fsynced), their hash is computed;
    2. the sidecar is replaced by one listing the new hash *and* the current file's;
    3. the temp file is renamed over ``path``;
    4. the sidecar is replaced by the new hash alone.

    Between 2 and 4 the sidecar names both versions, so whichever ``path`` holds matches it. A Ctrl-C inside
    the save waits for it to finish (``utils.deferred_interrupts``)."""
    path = Path(path)
    with deferred_interrupts():
        tmp = write_temp(path, lambda f: torch.save(obj, f))
        try:
            new = sha256_file(tmp)
            write_sha256(path, new, *_current_hashes(path))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        publish(tmp, path)
        write_sha256(path, new)
    return path


def _current_hashes(path: Path) -> tuple[str, ...]:
    """The hashes a reader may currently accept for ``path``: its sidecar's (a save killed midway leaves two),
    or the file's own when it has no readable sidecar; none without a file."""
    if not path.is_file():
        return ()
    try:
        return read_sha256s(path) or (sha256_file(path),)
    except ValueError:  # an unreadable sidecar: the file as it is
        return (sha256_file(path),)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path`` in the current format (``CHECKPOINT.migrate``). A checkpoint without a
    ``.sha256`` sidecar is loaded weights-only without the byte check: the first versions wrote none, and
    which version a file is can only be read after it is deserialised."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    state, _ = load_torch_file(path, what="checkpoint", expected_sha256=read_sha256s(path),
                               sha_source=str(sidecar_path(path)))
    if not isinstance(state, dict) or not str(state.get("format", "")).startswith("attnfd-checkpoint/"):
        raise UserError(f"{path}: not an attnfd checkpoint (format {state.get('format') if isinstance(state, dict) else None!r})")
    return CHECKPOINT.migrate(state, str(path), file=str(path))


def check_fits(modules: torch.nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """Raise ``ValueError`` naming ``path`` when a checkpoint's module state does not fit ``modules``
    (missing / unexpected keys, shapes — e.g. written for another number of classes or model)."""
    problems = state_mismatch(modules.state_dict(), state, shown=3)
    if problems:
        raise UserError(f"{path}: checkpoint does not fit this model ({'; '.join(problems)}); it was written for "
                         f"another model, number of classes or set of points — use another run directory or "
                         f"delete the checkpoint to start over")


def load_modules(modules: torch.nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """``modules.load_state_dict(state)`` with a clear error naming ``path`` when it does not fit."""
    check_fits(modules, state, path)
    modules.load_state_dict(state)


def check_resume(path: str | Path, modules: torch.nn.Module) -> dict[str, Any] | None:
    """Before a resumed run writes anything: its ``last.pt`` (if any) is readable and fits ``modules``.
    Returns the checkpoint (None without one), so callers check what else it records without a second read."""
    if not Path(path).is_file():
        return None
    state = load_checkpoint(path)
    check_fits(modules, state["modules"], path)
    return state

