"""``generate``: plan, render and write the whole twin, its hidden truth and a summary of what was written."""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
from rich.table import Table

from mdmt.errors import ConfigError
from mdmt.parallel import ordered_map
from mdmt.progress import progress_bar
from mdmt.sources.brixia import IMAGE_DIR
from mdmt.synth.anatomy import draw_anatomy, render
from mdmt.synth.devices import draw_cohort_profiles, draw_profiles
from mdmt.synth.faults import FAULTS, InjectedFault, injected_faults, plan_faults
from mdmt.synth.hospitals import RELEASE_FOLDERS
from mdmt.synth.layout import (
    AIFORCOVID_DIR,
    BRIXIA_DIR,
    COHORT_DIR,
    COHORT_IMAGES,
    GENERATOR_VERSION,
    PARAMS_FILE,
    TRUTH_DIR,
    Stream,
    stream_rng,
)
from mdmt.synth.plans import (
    ImagePlan,
    plan_aiforcovid,
    plan_brixia,
    plan_cohort,
)
from mdmt.synth.presets import (
    SynthPreset,
    check_preset,
    cohort_sizes,
    resolve_preset,
)
from mdmt.synth.sheets import (
    write_aiforcovid_sheets,
    write_brixia_tables,
    write_cohort_manifest,
)
from mdmt.synth.writers import write_image

INTERCEPTS_KEY = "prognosis_intercepts"
"""The one entry of the params file that the generator computes rather than takes as input."""
RENDER_STREAMS = {"brixia": Stream.BRIXIA_RENDER, "aiforcovid": Stream.AIFORCOVID_RENDER,
                  "cohort": Stream.COHORT_RENDER}


@dataclass
class SynthSummary:
    """What ``generate`` wrote."""

    out: Path
    preset: str
    seed: int
    decoupled: bool
    opacity: float
    images: dict[str, dict[str, int]]
    """DICOM files on disk per dataset and center (hospital / BrixIA vendor group)."""
    class_balance: dict[str, tuple[int, int]]
    """(MILD, SEVERE) patients per hospital (AIforCOVID and the cohort), as listed in the label tables."""
    brixia_global_mean: float
    seconds: float
    faults: list[InjectedFault] = field(default_factory=list)

    def table(self) -> Table:
        """A rich table of counts per dataset and center, class balance and faults."""
        table = Table(title=f"synthetic twin '{self.preset}' seed {self.seed}"
                            f"{' (decoupled)' if self.decoupled else ''}, opacity {self.opacity:g},"
                            f" {self.seconds:.1f} s")
        for column in ("dataset", "center", "images", "MILD / SEVERE"):
            table.add_column(column)
        for dataset, centers in self.images.items():
            for center, count in centers.items():
                balance = self.class_balance.get(center) if dataset != "brixia" else None
                table.add_row(dataset, center, str(count), f"{balance[0]} / {balance[1]}" if balance else "")
        table.caption = (f"BrixIA mean global score {self.brixia_global_mean:.2f}; faults: "
                         + (", ".join(f"{f.name} ({f.image_id})" for f in self.faults) or "none"))
        return table


def _changed_params(stamp: Path, wanted: dict[str, object]) -> list[str]:
    """The generator inputs in which the twin stamped by ``stamp`` (its params file) differs from ``wanted``."""
    try:
        stored = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return [f"{PARAMS_FILE} unreadable"]
    if not isinstance(stored, dict):
        return [f"{PARAMS_FILE} not a mapping"]
    wanted = json.loads(json.dumps(wanted))
    keys = sorted((set(stored) | set(wanted)) - {INTERCEPTS_KEY})
    return [key if isinstance(wanted.get(key), dict) else f"{key} {stored.get(key)!r} → {wanted.get(key)!r}"
            for key in keys if stored.get(key) != wanted.get(key)]


def _prepare_out(out: Path, wanted: dict[str, object], overwrite: bool) -> None:
    """Make ``out`` ready for a twin with the inputs ``wanted``, removing a previous twin there.

    Refused: ``out`` being a file, and data under the twin's folder names that the generator did not write;
    unless ``overwrite``, also a non-empty folder without a twin and a twin written with other inputs.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; the synthetic twin needs a folder")
    names = (BRIXIA_DIR, AIFORCOVID_DIR, COHORT_DIR, TRUTH_DIR)
    stamp = out / TRUTH_DIR / PARAMS_FILE
    if stamp.is_file():
        changed = _changed_params(stamp, wanted)
        if changed and not overwrite:
            raise ConfigError(f"{out}: holds a synthetic twin with other parameters ({'; '.join(changed)}); "
                              "use --overwrite (synth.overwrite) to replace it")
        for name in names:
            shutil.rmtree(out / name, ignore_errors=True)
    else:
        clashes = [name for name in names if (out / name).exists()]
        if clashes:
            raise ConfigError(f"{out}: {clashes} exist but were not written by the synthetic generator "
                              f"(no {TRUTH_DIR}/{PARAMS_FILE}); choose an empty folder")
        if not overwrite and out.is_dir() and any(out.iterdir()):
            raise ConfigError(f"{out}: not empty and holds no synthetic twin; choose an empty folder or use "
                              "--overwrite (synth.overwrite) to write beside its files")
    out.mkdir(parents=True, exist_ok=True)


def _draw_image(plan: ImagePlan, out: Path, seed: int, strength: float) -> dict[str, object]:
    """Render one planned image from its own random stream and write it; its truth row."""
    rng = stream_rng(seed, RENDER_STREAMS[plan.dataset], plan.index)
    rendered = render(draw_anatomy(plan.heart_size, rng), plan.severity, plan.profile, strength, rng)
    return write_image(plan, rendered, out, seed)


def generate(out: str | Path, preset: str | SynthPreset = "small", seed: int = 0, decoupled: bool = False,
             faults: Sequence[str] = (), opacity: float | None = None, progress: bool = True,
             cohort: bool = False, overwrite: bool = True, image_size: int | None = None,
             workers: int = 0) -> SynthSummary:
    """Write the synthetic BrixIA + AIforCOVID twin under ``out`` (``BRIXIA/``, ``AIforCOVID/``, truth).

    ``preset`` is a name of ``PRESETS`` or a ``SynthPreset``; ``opacity`` overrides its opacity strength
    (0.19 by default; the "subtle" setting is 0.14) and ``image_size`` its image side (px, before each device's
    own size jitter). ``workers`` >= 1 renders in that many processes (the same bytes: every image has its own
    random stream). ``decoupled`` makes prognosis follow the heart size
    instead of the lung severity (negative control; the images stay the same). Each name in ``faults``
    (see ``FAULTS``) plants exactly one faulty AIforCOVID item. ``cohort`` adds a third dataset,
    ``COHORT/manifest.csv`` and ``COHORT/images/``: hospitals G and H, half as many patients as
    AIforCOVID, one film each, labelled with both the outcome and the Brixia scores; it is drawn from
    streams of its own, so the other files stay the same. A previous twin in ``out`` is replaced;
    other data there is never overwritten. Without ``overwrite`` (``mdmt synth`` without ``--overwrite``),
    ``out`` must be missing, empty or a twin written with the same inputs.
    """
    start = time.perf_counter()
    spec = resolve_preset(preset)
    if image_size is not None:
        spec = replace(spec, image_size=int(image_size))
    check_preset(spec)
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        raise ConfigError(f"unknown synthetic fault(s) {unknown}; known: {list(FAULTS)}")
    if int(seed) != seed or seed < 0:
        raise ConfigError(f"synthetic seed must be a non-negative integer, got {seed!r}")
    strength = spec.opacity if opacity is None else float(opacity)
    if strength < 0:
        raise ConfigError(f"synthetic opacity must be >= 0, got {strength}")
    seed, out = int(seed), Path(out)
    inputs = {"generator_version": GENERATOR_VERSION, "preset": asdict(spec), "seed": seed, "decoupled": decoupled,
              "opacity": strength, "faults": sorted(set(faults))}
    cohort_part = {"cohort": cohort_sizes(spec)} if cohort else {}
    _prepare_out(out, inputs | cohort_part, overwrite)
    folders = [f"{BRIXIA_DIR}/{IMAGE_DIR}", *(f"{AIFORCOVID_DIR}/{f}" for f in RELEASE_FOLDERS.values())]
    if cohort:
        folders.append(f"{COHORT_DIR}/{COHORT_IMAGES}")
    for folder in folders:
        (out / folder).mkdir(parents=True, exist_ok=True)

    profiles = draw_profiles(seed, spec.image_size)
    plans: dict[str, list[ImagePlan]] = {"brixia": plan_brixia(spec, seed, profiles),
                                         "aiforcovid": plan_aiforcovid(spec, seed, profiles)}
    plan_faults(faults, plans["aiforcovid"], seed, profiles)
    if cohort:
        profiles |= draw_cohort_profiles(seed, spec.image_size)
        plans["cohort"] = plan_cohort(spec, seed, profiles)
    rows: dict[str, list[dict[str, object]]] = {name: [] for name in plans}
    every = [p for group in plans.values() for p in group]
    draw = functools.partial(_draw_image, out=out, seed=seed, strength=strength)
    with closing(ordered_map(draw, every, workers)) as drawn:
        for plan, row in zip(every, progress_bar(drawn, "synthetic images", total=len(every), enabled=progress)):
            rows[plan.dataset].append(row)

    truths = {"brixia": write_brixia_tables(plans["brixia"], pd.DataFrame(rows["brixia"]), out, seed)}
    truths["aiforcovid"], intercepts = write_aiforcovid_sheets(plans["aiforcovid"], pd.DataFrame(rows["aiforcovid"]),
                                                               out, seed, decoupled)
    if cohort:
        truths["cohort"], cohort_intercepts = write_cohort_manifest(plans["cohort"], pd.DataFrame(rows["cohort"]),
                                                                    out, seed, decoupled)
        intercepts |= cohort_intercepts
    truth_dir = out / TRUTH_DIR
    for name, truth in truths.items():
        truth.to_csv(truth_dir / f"{name}.csv", index=False)
    profile_table = pd.DataFrame([asdict(p) | {"manufacturers": "|".join(p.manufacturers)} for p in profiles.values()])
    profile_table.round(4).to_csv(truth_dir / "profiles.csv", index=False)

    params = inputs | {INTERCEPTS_KEY: {c: round(b, 4) for c, b in intercepts.items()}} | cohort_part
    (truth_dir / PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")

    labelled = pd.concat([t[t["prognosis"] != ""] for name, t in truths.items() if name != "brixia"])
    balance = {c: (int((g["prognosis"] == "MILD").sum()), int((g["prognosis"] == "SEVERE").sum()))
               for c, g in labelled.groupby("center")}
    return SynthSummary(
        out=out, preset=spec.name, seed=seed, decoupled=decoupled, opacity=strength,
        images={name: {str(c): int(n) for c, n in t.loc[t["fault"] != "missing_file", "center"].value_counts()
                       .sort_index().items()} for name, t in truths.items()},
        class_balance=balance, brixia_global_mean=float(truths["brixia"]["label_global"].mean()),
        seconds=time.perf_counter() - start, faults=injected_faults(plans["aiforcovid"]),
    )
