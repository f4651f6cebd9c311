"""The finalizer's pictures, as PNG bytes: confusion matrix, learning curve, misclassified images."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: workers, containers and CI have none

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """counts[i, j]: images of class i predicted as class j."""
    n = len(classes)
    return np.bincount(truth * n + predicted, minlength=n * n).reshape(n, n)


def confusion_matrix_png(counts: np.ndarray, classes: Sequence[str], title: str) -> bytes:
    recall = counts / np.maximum(1, counts.sum(1, keepdims=True))
    side = max(1.0, len(classes) / 10)  # ten classes fit the first size; more get more room
    fig, ax = plt.subplots(figsize=(8.2 * side, 7 * side))
    image = ax.imshow(recall, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if counts[i, j]:
                ax.text(
                    j,
                    i,
                    str(counts[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if recall[i, j] > 0.5 else "black",
                )
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    return _png(fig)


def learning_curve_png(
    trial_history: list[dict[str, float]],
    final_history: list[dict[str, float]],
    test_accuracy: float,
    trial_number: int,
) -> bytes:
    """Train loss (left axis) and accuracy (right axis) per epoch for the best trial and the final run."""
    fig, loss_ax = plt.subplots(figsize=(8, 4.8))
    acc_ax = loss_ax.twinx()
    # (history, key, axis, style, colour, alpha, label): the best trial's curves, then the final run's.
    curves = [
        (trial_history, "train_loss", loss_ax, "o--", "tab:blue", 1.0, f"trial {trial_number} train loss"),
        (trial_history, "val_accuracy", acc_ax, "o-", "tab:orange", 1.0, f"trial {trial_number} validation accuracy"),
        (final_history, "train_loss", loss_ax, ".-", "tab:blue", 0.6, "final run train loss"),
        (final_history, "train_accuracy", acc_ax, ".-", "tab:green", 0.6, "final run train accuracy"),
    ]
    for history, key, ax, style, colour, alpha, label in curves:
        if history:
            ax.plot(
                [h["epoch"] for h in history], [h[key] for h in history], style, color=colour, alpha=alpha, label=label
            )
    if final_history:
        epochs = [h["epoch"] for h in final_history]
        acc_ax.plot(
            [epochs[-1]],
            [test_accuracy],
            "*",
            color="tab:red",
            markersize=16,
            label=f"final model test accuracy {test_accuracy:.4f}",
        )
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("train loss")
    acc_ax.set_ylabel("accuracy")
    handles = loss_ax.get_legend_handles_labels()[0] + acc_ax.get_legend_handles_labels()[0]
    labels = loss_ax.get_legend_handles_labels()[1] + acc_ax.get_legend_handles_labels()[1]
    loss_ax.legend(handles, labels, loc="center right", fontsize=8)
    loss_ax.set_title(f"Learning curves: best trial {trial_number} and the final retrain")
    loss_ax.grid(alpha=0.3)
    return _png(fig)


def misclassified_png(
    images: np.ndarray,
    truth: np.ndarray,
    predicted: np.ndarray,
    confidence: np.ndarray,
    classes: Sequence[str],
    limit: int = 36,
) -> bytes:
    """The most confident mistakes first: they say most about what the model gets wrong."""
    wrong = np.flatnonzero(truth != predicted)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    cols = 6
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.2), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        image = images[i][0] if images[i].ndim == 3 and images[i].shape[0] == 1 else images[i]
        if image.ndim == 3:  # colour (C, H, W) -> (H, W, C)
            image = image.transpose(1, 2, 0)
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"true {classes[truth[i]]}\npred {classes[predicted[i]]} {confidence[i]:.0%}", fontsize=7)
    fig.suptitle(
        f"{len(wrong)} most confident of {int((truth != predicted).sum())} misclassified test images", fontsize=10
    )
    return _png(fig)
