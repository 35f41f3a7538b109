"""Clinical variables as model input: an encoder fitted on a run's training records, and the logistic regression
that is both the clinical-only baseline and the clinical term of a fused head.

``ClinicalEncoder`` turns record columns into a float32 matrix. A numeric column (every present value parses)
is standardised with the training mean and standard deviation; a blank cell becomes the training mean (0 after
standardising). A text column is one-hot over the categories seen in training (an unseen category: all zeros).
Every column also gets a 0/1 missing-indicator column. Only ``fit`` looks at values, so validation and test
records never move the scaling or the imputation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdmt.errors import ConfigError, DataError
from mdmt.runs import write_json

ENCODER_FILE = "clinical_encoder.json"


def check_columns(records: pd.DataFrame, columns: Sequence[str], dataset: str) -> None:
    """ConfigError naming the clinical columns ``records`` lacks."""
    missing = [c for c in columns if c not in records.columns]
    if missing:
        raise ConfigError(f"clinical column(s) {missing} are not in dataset {dataset!r}'s sheet "
                          f"(it has {[c for c in records.columns if c not in ('image_id', 'patient_id')][:40]})")


@dataclass
class ClinicalEncoder:
    """Scaling, imputation and one-hot coding of clinical columns, fitted on training records only."""

    columns: list[str]
    numeric: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Numeric column → (training mean, training standard deviation; 1 when constant)."""
    categories: dict[str, list[str]] = field(default_factory=dict)
    """Text column → its training categories, in order."""

    def fit(self, records: pd.DataFrame) -> ClinicalEncoder:
        """Learn means, standard deviations and categories from ``records`` (the training fold)."""
        check_columns(records, self.columns, "training")
        self.numeric, self.categories = {}, {}
        for name in self.columns:
            values = records[name]
            present = values.dropna()
            parsed = pd.to_numeric(present, errors="coerce")
            if parsed.notna().all():
                mean = float(parsed.mean()) if len(parsed) else 0.0
                sd = float(parsed.std(ddof=0)) if len(parsed) > 1 else 0.0
                self.numeric[name] = (mean, sd if sd > 0 else 1.0)
            else:
                self.categories[name] = sorted(present.astype(str).unique().tolist())
        return self

    @property
    def names(self) -> list[str]:
        """The output columns, in order."""
        out: list[str] = []
        for name in self.columns:
            out += [name] if name in self.numeric else [f"{name}={c}" for c in self.categories.get(name, [])]
            out.append(f"{name}_missing")
        return out

    @property
    def dim(self) -> int:
        """Width ``D`` of the encoded features."""
        return len(self.names)

    def transform(self, records: pd.DataFrame) -> np.ndarray:
        """float32 ``(N, D)`` features of ``records``."""
        if not self.numeric and not self.categories and self.columns:
            raise DataError("ClinicalEncoder.transform before fit")
        check_columns(records, self.columns, "the records")
        parts: list[np.ndarray] = []
        for name in self.columns:
            values = records[name]
            missing = values.isna().to_numpy()
            if name in self.numeric:
                mean, sd = self.numeric[name]
                parsed = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
                missing = missing | np.isnan(parsed)
                parts.append(np.where(missing, 0.0, (parsed - mean) / sd)[:, None])
            else:
                text = values.astype(str).to_numpy()
                parts.append(np.stack([(text == c) & ~missing for c in self.categories[name]], axis=1)
                             if self.categories[name] else np.zeros((len(values), 0)))
            parts.append(missing[:, None])
        return np.concatenate(parts, axis=1).astype(np.float32) if parts else np.zeros((len(records), 0), np.float32)

    def to_dict(self) -> dict[str, Any]:
        """The fitted state as plain numbers and strings."""
        return {"columns": self.columns, "numeric": {k: list(v) for k, v in self.numeric.items()},
                "categories": self.categories, "features": self.names}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> ClinicalEncoder:
        """The encoder ``to_dict`` wrote."""
        return cls(list(state["columns"]), {k: (float(v[0]), float(v[1])) for k, v in state["numeric"].items()},
                   {k: list(v) for k, v in state["categories"].items()})

    def save(self, run_dir: Path) -> Path:
        """Write ``clinical_encoder.json`` into ``run_dir``."""
        path = Path(run_dir) / ENCODER_FILE
        write_json(self.to_dict(), path)
        return path


def fit_logit_term(features: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A scikit-learn logistic regression (L2, C = 1) of 0/1 ``labels`` on ``features``, as the ``(weight (2, D),
    bias (2,))`` of a two-logit head: logit 0 is 0 and logit 1 the regression's log-odds of class 1."""
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(labels)) < 2:
        raise DataError(f"the clinical logistic regression needs both classes in the training fold, got "
                        f"{np.unique(labels)}")
    model = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(features, labels)
    weight = np.zeros((2, features.shape[1]))
    weight[1] = model.coef_[0]
    return weight, np.array([0.0, model.intercept_[0]])
