"""Segmentation metrics computed by hand in the tests (class by class, no confusion matrix), to check the
numbers the pipeline reports against: mIoU is the mean, over classes present in the prediction or the
label, of |pred ∩ label| / |pred ∪ label| on pixels whose label is not 255."""

from __future__ import annotations

import numpy as np
import torch


def val_loader(cfg):
    """The val split under ``cfg.eval``'s protocol, as the pipeline's evaluation reads it."""
    from attnfd_pipeline.data.loaders import make_val_loader
    from attnfd_pipeline.data.source import ImageSource
    from attnfd_pipeline.engine.protocol import EvalProtocol

    src = ImageSource.from_config(cfg, cfg.data.val_split)
    return make_val_loader(src, EvalProtocol.from_config(cfg), batch_size=4, workers=0)


@torch.no_grad()
def hand_metrics(model, loader, num_classes: int) -> dict:
    """``model(images)["out"]`` scored on ``loader``: mIoU, pixel accuracy and per-class IoU (None where a
    class is in neither prediction nor label)."""
    model.eval()
    preds, labels = [], []
    for batch in loader:
        preds.append(model(batch["image"])["out"].argmax(1).numpy().ravel())
        labels.append(batch["label"].numpy().ravel())
    pred, label = np.concatenate(preds), np.concatenate(labels)
    keep = label != 255
    pred, label = pred[keep], label[keep]
    ious = []
    for c in range(num_classes):
        union = np.sum((pred == c) | (label == c))
        ious.append(None if union == 0 else float(np.sum((pred == c) & (label == c)) / union))
    present = [v for v in ious if v is not None]
    return {"miou": sum(present) / len(present), "pixel_acc": float(np.mean(pred == label)), "per_class_iou": ious}
