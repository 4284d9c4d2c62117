"""Attention-guided feature distillation (AttnFD) pipeline: cached teacher targets, replayable augmentation."""

__version__ = "0.1.0"
