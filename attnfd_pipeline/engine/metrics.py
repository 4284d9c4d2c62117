"""Segmentation metrics from one confusion matrix over a whole split (docs/method.md "Evaluation").

Classes absent from both prediction and label are excluded from the means (nan-mean), as in the
reference evaluation.
"""

from __future__ import annotations

import numpy as np
import torch
from attnfd_pipeline.errors import UserError


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """(C, C) int64 matrix, rows = ground truth, columns = prediction; ``ignore_index`` pixels skipped."""
    valid = target != ignore_index
    t = target[valid].long()
    p = pred[valid].long()
    if t.numel() and (int(t.max()) >= num_classes or int(t.min()) < 0):
        raise UserError(f"label values {sorted(set(t.unique().tolist()) - set(range(num_classes)))} "
                         f"outside [0, {num_classes}) ∪ {{{ignore_index}}}")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: torch.Tensor | np.ndarray, class_names=None) -> dict:
    """mIoU, pixel accuracy, class-mean accuracy, frequency-weighted IoU and per-class IoU."""
    cm = np.asarray(cm.cpu() if isinstance(cm, torch.Tensor) else cm, dtype=np.float64)
    tp = np.diag(cm)
    gt = cm.sum(1)
    pred = cm.sum(0)
    union = gt + pred - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc_c = np.where(gt > 0, tp / gt, np.nan)
    total = cm.sum()
    freq = gt / total if total else np.zeros_like(gt)
    present = union > 0
    out = {
        "miou": float(np.nanmean(iou)) if present.any() else float("nan"),
        "pixel_acc": float(tp.sum() / total) if total else float("nan"),
        "class_acc": float(np.nanmean(acc_c)) if (gt > 0).any() else float("nan"),
        "fwiou": float((freq[present] * iou[present]).sum()) if present.any() else float("nan"),
        "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
    }
    if class_names is not None:
        out["class_names"] = list(class_names)
    return out
