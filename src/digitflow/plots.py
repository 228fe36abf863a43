"""Figures people would rather look at than read: curves, confusion matrix, prediction grid."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def training_curves(history: pd.DataFrame, path: Path) -> None:
    """Loss and accuracy per epoch, training against validation."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("loss", "accuracy"), strict=True):
        axis.plot(history["epoch"], history[metric], marker="o", label="train")
        axis.plot(history["epoch"], history[f"val_{metric}"], marker="o", label="validation")
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def confusion_matrix(matrix: np.ndarray, path: Path, title: str) -> None:
    """A confusion matrix with counts in each cell (rows: true digit, columns: predicted)."""
    figure, axis = plt.subplots(figsize=(7, 6))
    image = axis.imshow(np.log1p(matrix), cmap="Blues")
    for (row, col), count in np.ndenumerate(matrix):
        color = "white" if matrix[row, col] > matrix.max() / 2 else "black"
        axis.text(col, row, str(count), ha="center", va="center", fontsize=8, color=color)
    axis.set_xticks(range(matrix.shape[1]))
    axis.set_yticks(range(matrix.shape[0]))
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, label="log(1 + count)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def prediction_grid(
    images: np.ndarray, true: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, path: Path
) -> None:
    """Test images titled 'Predicted: p, True: t'; wrong predictions in red with a red frame."""
    columns = 6
    rows = int(np.ceil(len(images) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.9, rows * 2.1))
    for axis in np.ravel(axes):
        axis.axis("off")
    for axis, image, t, p, c in zip(
        np.ravel(axes), images, true, predicted, confidence, strict=False
    ):
        wrong = t != p
        axis.imshow(image.squeeze(), cmap="gray_r")
        axis.set_title(
            f"Predicted: {p} ({c:.0%})\nTrue: {t}",
            fontsize=8,
            color="red" if wrong else "black",
        )
        if wrong:
            axis.axis("on")
            axis.set_xticks([])
            axis.set_yticks([])
            for spine in axis.spines.values():
                spine.set_edgecolor("red")
                spine.set_linewidth(2.5)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
