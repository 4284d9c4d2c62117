"""Checkpoints that describe themselves and are written atomically (temp file + fsync + rename)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from attnfd_pipeline.utils import atomic_torch_save

FORMAT = "attnfd-checkpoint/1"


def save_checkpoint(path: str | Path, *, modules: torch.nn.Module, optimizer, scheduler, scaler, epoch: int,
                    step: int, best: float, rng: dict, config: dict, extra: dict | None = None) -> Path:
    """``epoch`` is the number of finished epochs: resume continues at epoch ``epoch``."""
    state = {
        "format": FORMAT,
        "modules": modules.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "step": step,
        "best": best,
        "rng": rng,
        "config": config,
        "extra": extra or {},
    }
    return atomic_torch_save(state, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated/corrupt file
        raise ValueError(f"{path}: not a readable checkpoint ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not an attnfd checkpoint (format {state.get('format') if isinstance(state, dict) else None!r})")
    return state
