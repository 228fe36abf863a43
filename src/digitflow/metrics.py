"""Per-class metrics of predicted digits, shared by the evaluate stage and the model card."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .config import NUM_CLASSES


def per_class_report(true: np.ndarray, predicted: np.ndarray) -> pd.DataFrame:
    """Precision, recall, F1 and support for each digit."""
    from sklearn.metrics import classification_report

    report = classification_report(
        true, predicted, labels=list(range(NUM_CLASSES)), output_dict=True, zero_division=0
    )
    rows = [{"digit": d, **report[str(d)]} for d in range(NUM_CLASSES)]
    return pd.DataFrame(rows).rename(columns={"f1-score": "f1"})


def confusion(true: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """The 10x10 confusion matrix (rows: true digit, columns: predicted)."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(true, predicted, labels=list(range(NUM_CLASSES)))
