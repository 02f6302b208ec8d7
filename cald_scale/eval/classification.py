# Classification metrics from a confusion matrix: per-rank matrices sum across ranks, and
# accuracy / macro-F1 of the sum are exactly those of the whole split.
"""Accuracy and macro-F1 for sequence classification.

Each rank builds `confusion_matrix` over its own examples (on the device of its
predictions, ready for `dist.all_reduce`); `metrics_from_confusion` turns the summed matrix
into metrics. Macro-F1 follows the usual convention (scikit-learn's default): it averages
F1 over the classes that occur in the labels or the predictions; a class in neither has
no defined F1 and is left out, and a class in only one of them scores 0.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["classification_metrics", "confusion_matrix", "metrics_from_confusion", "per_class_f1"]


def confusion_matrix(predictions, labels, num_labels: int) -> torch.Tensor:
    """(num_labels, num_labels) int64 counts, rows the true label, columns the prediction.

    predictions: class ids (n,) or logits (n, num_labels); labels: class ids (n,). Negative
    labels (IGNORE_INDEX, -100: an eval batch's filler) are skipped.
    """
    predictions = torch.as_tensor(predictions)
    labels = torch.as_tensor(labels, device=predictions.device)
    if predictions.ndim == 2:
        if predictions.shape[-1] != num_labels:
            raise ValueError(f"logits have {predictions.shape[-1]} classes, expected num_labels={num_labels}")
        predictions = predictions.argmax(dim=-1)
    if predictions.ndim != 1 or labels.shape != predictions.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} must be (n,) alike")
    predictions, labels = predictions.long(), labels.long()
    keep = labels >= 0
    predictions, labels = predictions[keep], labels[keep]
    for name, ids in (("prediction", predictions), ("label", labels)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_labels):
            raise ValueError(f"a {name} id is outside [0, {num_labels}): min {int(ids.min())}, max {int(ids.max())}")
    flat = torch.bincount(labels * num_labels + predictions, minlength=num_labels * num_labels)
    return flat.reshape(num_labels, num_labels)


def per_class_f1(matrix) -> np.ndarray:
    """F1 = 2 TP / (2 TP + FP + FN) per class; NaN for a class in neither labels nor
    predictions (0 / 0), 0 for one in only one of them."""
    m = torch.as_tensor(matrix).detach().cpu().numpy().astype(np.float64)
    tp = np.diag(m)
    denom = 2 * tp + (m.sum(axis=0) - tp) + (m.sum(axis=1) - tp)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / denom, np.nan)


def metrics_from_confusion(matrix) -> dict[str, float | int]:
    """accuracy, macro_f1 (see the module note) and num_examples of a (summed) matrix."""
    m = torch.as_tensor(matrix).detach().cpu().numpy()
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"a confusion matrix is square, got shape {m.shape}")
    total = int(m.sum())
    if total == 0:
        raise ValueError("the confusion matrix is empty: no example was scored")
    f1 = per_class_f1(m)
    return {
        "accuracy": float(np.trace(m) / total),
        "macro_f1": float(np.nanmean(f1)),
        "num_examples": total,
    }


def classification_metrics(predictions, labels, num_labels: int) -> dict[str, float | int]:
    """`metrics_from_confusion` of one process's predictions (no cross-rank sum)."""
    return metrics_from_confusion(confusion_matrix(predictions, labels, num_labels))
