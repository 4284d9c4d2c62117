"""Distillation losses, registered by name."""

from attnfd_pipeline.losses.attnfd import NORMS, attnfd_loss

__all__ = ["NORMS", "attnfd_loss"]
