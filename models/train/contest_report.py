"""The contest's verdict from ``docs/results.json``: MGDIN against the best tuned baseline and its
own w/o-DI ablation, per dataset, against the number of feature tokens (issue #24's figure).

Rows come from ``ctrserve contest`` (models/contest.py): variant ``tuned`` for every model,
``tuned_wo_di`` and ``tuned_static_masks_finetuned`` for MGDIN, and MGDIN's DNN twin (``dnn``,
``mgdin_twin``): what the attention blocks add over MGDIN's own head and settings. A gap is "more
than the seed noise" when it exceeds twice its standard error over seeds (the two means' seed SEs
combined), so a one-seed difference is never called.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TUNED = "tuned"
WO_DI = "tuned_wo_di"
STATIC = "tuned_static_masks_finetuned"  # `ctrserve calibrate --finetune-epochs` of a tuned run
#: MGDIN's DNN twin, recorded under ``dnn``: MGDIN's head and trainer settings without the attention blocks
TWIN, TWIN_MODEL = "mgdin_twin", "dnn"
SUBJECT = "mgdin"
#: static masks are served only when they cost at most this much AUC (models/calibrate.py)
STATIC_BUDGET = 0.002


@dataclass(frozen=True)
class Arm:
    """One (model, variant) on one dataset: its seeds' test AUCs."""

    model: str
    variant: str
    aucs: tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(self.aucs) / len(self.aucs)

    @property
    def sem(self) -> float:
        """Standard error of the mean over seeds (0 for one seed)."""
        n = len(self.aucs)
        if n < 2:
            return 0.0
        var = sum((a - self.mean) ** 2 for a in self.aucs) / (n - 1)
        return math.sqrt(var / n)


@dataclass(frozen=True)
class Gap:
    value: float
    se: float
    seeds: int  # the fewer seeds of the two arms: with one, that arm's noise is unknown

    @property
    def beyond_noise(self) -> bool:
        return self.seeds >= 2 and self.se > 0 and abs(self.value) > 2 * self.se

    def text(self) -> str:
        if self.seeds < 2:  # an SE from the other arm alone would understate the noise
            return f"{self.value:+.4f} (one seed: noise unknown)"
        mark = "" if self.beyond_noise else " (within noise)"
        return f"{self.value:+.4f} ± {self.se:.4f}{mark}"


def gap(a: Arm, b: Arm) -> Gap:
    return Gap(a.mean - b.mean, math.hypot(a.sem, b.sem), min(len(a.aucs), len(b.aucs)))


@dataclass(frozen=True)
class Verdict:
    dataset: str
    tokens: int
    dynamic: Arm
    static: Arm | None  # None until the contest's calibrate steps have run
    best_baseline: Arm
    wo_di: Arm | None
    twin: Arm | None = None

    @property
    def mgdin(self) -> Arm:
        """The served MGDIN: static masks when calibrated, else the dynamic runs (shown as such)."""
        return self.static or self.dynamic

    @property
    def over_baseline(self) -> Gap:
        return gap(self.mgdin, self.best_baseline)

    @property
    def over_wo_di(self) -> Gap | None:
        return gap(self.dynamic, self.wo_di) if self.wo_di else None

    @property
    def over_twin(self) -> Gap | None:
        return gap(self.dynamic, self.twin) if self.twin else None

    @property
    def static_minus_dynamic(self) -> float | None:
        return self.static.mean - self.dynamic.mean if self.static else None


def verdicts(rows: list[dict[str, Any]]) -> list[Verdict]:
    """One verdict per dataset with tuned MGDIN and at least one tuned baseline, by token count."""
    arms: dict[str, dict[tuple[str, str], list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["variant"] in (TUNED, WO_DI, STATIC, TWIN):
            arms[r["dataset"]][(r["model"], r["variant"])].append(r)
    out = []
    for dataset, by_arm in arms.items():
        found = {key: Arm(*key, tuple(r["auc"] for r in sorted(rs, key=lambda r: r["seed"])))
                 for key, rs in by_arm.items()}
        dynamic = found.get((SUBJECT, TUNED))
        baselines = [a for (m, v), a in found.items() if v == TUNED and m != SUBJECT]
        if dynamic is None or not baselines:
            continue
        tokens = next((r["tokens"] for rs in by_arm.values() for r in rs if "tokens" in r), 0)
        out.append(Verdict(dataset, tokens, dynamic, found.get((SUBJECT, STATIC)),
                           max(baselines, key=lambda a: a.mean), found.get((SUBJECT, WO_DI)),
                           found.get((TWIN_MODEL, TWIN))))
    return sorted(out, key=lambda v: (v.tokens, v.dataset))


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The verdict table for docs/results.md (empty when no contest has run)."""
    vs = verdicts(rows)
    if not vs:
        return []
    lines = ["## MGDIN contest (`ctrserve contest`, tuned settings)", "",
             "MGDIN with static masks against the best tuned baseline; MGDIN against its own w/o-DI "
             "ablation and against its DNN twin (MGDIN's head and trainer settings, no attention blocks), "
             "dynamic masks on both sides; mean over seeds ± the seed standard error of the "
             "difference, \"within noise\" when under twice that (no noise figure while one arm has a single "
             "seed). Figure: docs/img/mgdin_tokens_gain.png.", "",
             "| dataset | tokens | MGDIN (static) | best baseline | MGDIN − best | MGDIN − w/o DI | MGDIN − twin "
             "| static − dynamic |",
             "|---|---|---|---|---|---|---|---|"]
    for v in vs:
        wo = v.over_wo_di.text() if v.over_wo_di else "–"
        twin = v.over_twin.text() if v.over_twin else "–"
        delta = v.static_minus_dynamic
        shift = "–" if delta is None else f"{delta:+.4f}" + ("" if abs(delta) <= STATIC_BUDGET else " (over 0.002)")
        kind = "" if v.static else ", dynamic: not calibrated yet"
        lines.append(f"| {v.dataset} | {v.tokens} | {v.mgdin.mean:.4f} ({_seeds(v.mgdin)}{kind}) | "
                     f"{v.best_baseline.model} {v.best_baseline.mean:.4f} ({_seeds(v.best_baseline)}) | "
                     f"{v.over_baseline.text()} | {wo} | {twin} | {shift} |")
    return [*lines, ""]


def _seeds(arm: Arm) -> str:
    n = len(arm.aucs)
    return f"{n} seed" if n == 1 else f"{n} seeds"


def tick_labels(vs: list[Verdict]) -> dict[int, str]:
    """Token count -> its tick label: the count, then each dataset with that many tokens (its data-set
    tag on a line of its own, "(dynamic)" while MGDIN is not calibrated there)."""
    names: dict[int, list[str]] = {}
    for v in vs:
        names.setdefault(v.tokens, []).append(v.dataset.replace("-", "\n", 1) + ("" if v.static else "\n(dynamic)"))
    return {t: "\n".join([str(t), *names[t]]) for t in sorted(names)}


def plot(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """MGDIN − best baseline, MGDIN − w/o DI and MGDIN − its twin against feature tokens, one point per
    dataset."""
    vs = verdicts(rows)
    if not vs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    x = [v.tokens for v in vs]
    base = [v.over_baseline for v in vs]
    ax.errorbar(x, [g.value for g in base], yerr=[2 * g.se for g in base], fmt="o-", capsize=3,
                label="MGDIN (static masks) − best tuned baseline")
    for shift, fmt, label, gaps in (
            (0.15, "s--", "MGDIN − MGDIN w/o deferred interaction", [(v.tokens, v.over_wo_di) for v in vs]),
            (0.3, "^:", "MGDIN − its DNN twin (no attention blocks)", [(v.tokens, v.over_twin) for v in vs])):
        shown = [(t, g) for t, g in gaps if g]
        if shown:
            ax.errorbar([t + shift for t, _ in shown], [g.value for _, g in shown], yerr=[2 * g.se for _, g in shown],
                        fmt=fmt, capsize=3, label=label)
    # the datasets name their ticks: labels inside the axes would cross the series' lines
    ticks = tick_labels(vs)
    ax.set_xticks(list(ticks), list(ticks.values()), fontsize=7)
    ax.axhline(0.0, color="grey", lw=0.8)
    # room around the points: one dataset alone must not zoom the axis to 0.15
    ax.set_xlim(min(x) - 2, max(x) + 2)
    ax.set_xlabel("feature tokens per sample")
    ax.set_ylabel("test AUC difference (± 2 seed SE)")
    ax.set_title("Where does deferral help?")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.24), ncol=1)  # below: never over a point
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
