"""AIforCOVID's clinical sheet columns, drawn from severity, age and outcome, with 10–30 % blank cells.

The columns are those of the real sheets: age and sex, vital signs and blood tests (continuous),
symptoms and comorbidities (0/1), the patient's position at the film (1 = supine) and death.

The outcome signal is partly in the lungs (the severity effects) and partly outside them: given the severity,
the inflammation markers, the blood gases and respiratory failure still shift with the outcome
(``outcome_effect``), so the clinical columns add information an image cannot hold. Blanks are realistic
rather than uniform: the arterial blood gas panel (PaO2, SaO2, PaCO2, pH) is missing as a whole, and more
often for MILD patients (``GAS_BLANK``); every other column is blank at random, 10–30 % per column.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import expit

from mdmt.synth.anatomy import SEVERITY_MEAN
from mdmt.synth.plans import ImagePlan


@dataclass(frozen=True)
class Measurement:
    """A continuous clinical column: N(mean + severity_effect * s, sd), clipped, rounded."""

    name: str
    mean: float
    sd: float
    severity_effect: float
    low: float
    high: float
    decimals: int
    outcome_effect: float = 0.0
    """Shift of a SEVERE patient's mean at equal severity."""


@dataclass(frozen=True)
class Condition:
    """A 0/1 clinical column: logit(base) + per_decade * (age - 65) / 10 + severity_effect * (s - E[s])."""

    name: str
    base: float
    per_decade: float = 0.0
    severity_effect: float = 0.0
    outcome_effect: float = 0.0
    """Added to the logit of a SEVERE patient at equal severity."""


MEASUREMENTS = (
    Measurement("Temp_C", 37.6, 0.7, 0.6, 35.5, 41.0, 1),
    Measurement("DaysFever", 5.0, 3.0, 2.0, 0.0, 30.0, 0),
    Measurement("WBC", 7.0, 2.5, 3.0, 1.0, 30.0, 2),
    Measurement("RBC", 4.6, 0.6, -0.3, 2.5, 6.5, 2),
    Measurement("CRP", 60.0, 50.0, 80.0, 0.1, 400.0, 1, 40.0),
    Measurement("Fibrinogen", 550.0, 150.0, 150.0, 150.0, 1200.0, 0),
    Measurement("Glucose", 115.0, 30.0, 25.0, 60.0, 400.0, 0),
    Measurement("PCT", 0.3, 0.5, 0.6, 0.01, 20.0, 2),
    Measurement("LDH", 300.0, 90.0, 200.0, 100.0, 1500.0, 0, 110.0),
    Measurement("INR", 1.1, 0.15, 0.1, 0.8, 3.0, 2),
    Measurement("D-dimer", 900.0, 700.0, 1200.0, 100.0, 10000.0, 0, 700.0),
    Measurement("Ox_percentage", 95.0, 3.0, -9.0, 60.0, 100.0, 0, -2.5),
    Measurement("PaO2", 78.0, 14.0, -25.0, 30.0, 150.0, 0, -12.0),
    Measurement("SaO2", 95.0, 3.0, -8.0, 60.0, 100.0, 1, -2.5),
    Measurement("PaCO2", 36.0, 5.0, -2.0, 20.0, 70.0, 0),
    Measurement("pH", 7.44, 0.04, 0.02, 7.1, 7.7, 2),
)
CONDITIONS = (
    Condition("Positivity at admission", 0.9),
    Condition("Cough", 0.55),
    Condition("DifficultyInBreathing", 0.3, severity_effect=2.0),
    Condition("CardiovascularDisease", 0.3, 0.5),
    Condition("IschemicHeartDisease", 0.12, 0.5),
    Condition("AtrialFibrillation", 0.1, 0.6),
    Condition("HeartFailure", 0.06, 0.6),
    Condition("Ictus", 0.05, 0.5),
    Condition("HighBloodPressure", 0.45, 0.5),
    Condition("Diabetes", 0.18, 0.3),
    Condition("Dementia", 0.06, 0.9),
    Condition("BPCO", 0.08, 0.4),
    Condition("Cancer", 0.1, 0.3),
    Condition("Chronic Kidney disease", 0.07, 0.5),
    Condition("RespiratoryFailure", 0.15, severity_effect=2.5, outcome_effect=1.0),
    Condition("Obesity", 0.15),
    Condition("Position", 0.3, severity_effect=1.5),
)
"""``Position`` 1 = supine (more likely when severe)."""
BLANK_RANGE = (0.10, 0.30)
"""Share of blank cells per clinical column blank at random."""
GAS_PANEL = ("PaO2", "SaO2", "PaCO2", "pH")
GAS_BLANK = {0: 0.30, 1: 0.10}
"""Chance that a MILD (0) or SEVERE (1) patient has no blood gas panel."""
DEATH_GIVEN_SEVERE = 0.33


def clinical_table(plans: Sequence[ImagePlan], prognosis: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    """The clinical columns of the patients in ``plans``, drawn from severity, age and outcome, with blanks."""
    severity = np.array([plan.severity for plan in plans])
    age = np.array([plan.age for plan in plans], dtype=float)
    n = len(plans)
    columns: dict[str, pd.Series] = {
        "Age": pd.Series(age.astype(int), dtype="Int64"),
        "Sex": pd.Series([int(plan.sex == "M") for plan in plans], dtype="Int64"),
    }
    for item in MEASUREMENTS:
        mean = item.mean + item.severity_effect * severity + item.outcome_effect * prognosis
        values = np.clip(rng.normal(mean, item.sd), item.low, item.high)
        rounded = np.round(values, item.decimals) if item.decimals else np.rint(values).astype(int)
        columns[item.name] = pd.Series(rounded, dtype=float if item.decimals else "Int64")
    for item in CONDITIONS:
        logit = (np.log(item.base / (1 - item.base)) + item.per_decade * (age - 65.0) / 10.0
                 + item.severity_effect * (severity - SEVERITY_MEAN) + item.outcome_effect * prognosis)
        columns[item.name] = pd.Series((rng.random(n) < expit(logit)).astype(int), dtype="Int64")
    columns["Death"] = pd.Series(((prognosis == 1) & (rng.random(n) < DEATH_GIVEN_SEVERE)).astype(int), dtype="Int64")
    table = pd.DataFrame(columns)
    no_gas = rng.random(n) < np.where(prognosis == 1, GAS_BLANK[1], GAS_BLANK[0])
    for name in table.columns:
        blank = no_gas if name in GAS_PANEL else rng.random(n) < rng.uniform(*BLANK_RANGE)
        table.loc[blank, name] = pd.NA
    return table
