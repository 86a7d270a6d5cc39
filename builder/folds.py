"""Cross-validation folds."""

from __future__ import annotations

import numpy as np
import pandas as pd

from runtime.data import labels_of


def assign_folds(df: pd.DataFrame, k: int, seed: int) -> np.ndarray:
    """Fold of each row: stratified by label, with identical inputs kept in one fold so none leak."""
    key = df["QuestionId"] + "\x1f" + df["MC_Answer"] + "\x1f" + df["StudentExplanation"]
    groups = pd.DataFrame({"key": key, "label": labels_of(df)}).drop_duplicates("key")
    groups = groups.sample(frac=1.0, random_state=seed).sort_values("label", kind="stable")
    fold_of = dict(zip(groups["key"], np.arange(len(groups)) % k))
    return key.map(fold_of).to_numpy()
