"""How the contest's searches went, from their records in ``docs/tuning/<dataset>/<model>.json``
(written by ``ctrserve tune``, models/tune.py): trials finished and pruned, which trial won, and
whether the model's own defaults beat the search. A search without its defaults trial is still
running when it has fewer finished trials than its command's ``--trials`` (it resumes from the
record); a finished one without a defaults trial predates that trial. Searches are summed up per
budget (trials and held settings), since only those with one budget compare.

It answers "how wide was the search" from the records, so the docs never count trials by hand.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The record's vocabulary, defined here (no torch, no optuna) for the tuner that writes records
# (models/tune.py) and for this report that reads them.
#: the trial states a budget counts; a trial cut short by Ctrl-C is stored as FAIL: it is in the
#: record, not in the budget
BUDGET_STATES = ("COMPLETE", "PRUNED")
#: the record's entry for the model's own settings, trained beside the search (``tune.defaults_trial``)
DEFAULTS = "defaults"
#: trials among the first this many (by number) count as "the first draws"
FIRST_DRAWS = 2


@dataclass(frozen=True)
class Search:
    dataset: str
    model: str
    held: dict[str, Any]
    budget: int  # the command's --trials
    finished: int
    pruned: int
    best_trial: int
    best_valid: float
    defaults_valid: float | None  # None while the search runs

    @property
    def done(self) -> bool:
        return self.finished >= self.budget

    @property
    def defaults_won(self) -> bool:
        return self.defaults_valid is not None and self.defaults_valid > self.best_valid


def load_searches(root: Path) -> list[Search]:
    """Every record under ``root`` (docs/tuning) with a finished trial, by dataset and model."""
    out = []
    for path in sorted(root.glob("*/*.json")):
        record = json.loads(path.read_text())
        finished = [t for t in record["trials"] if t["state"] in BUDGET_STATES]
        complete = [t for t in finished if t["state"] == "COMPLETE"]
        if not complete:
            continue
        best = max(complete, key=lambda t: t["valid_auc"])
        defaults = record.get(DEFAULTS)
        budget = re.search(r"--trials[ =](\d+)", record["command"])
        if budget is None:
            raise ValueError(f"{path}: the command {record['command']!r} names no --trials budget")
        out.append(Search(record["dataset"], record["model"], record.get("fixed") or {}, int(budget.group(1)),
                          len(finished), len(finished) - len(complete), best["number"], best["valid_auc"],
                          defaults["valid_auc"] if defaults else None))
    return out


def _held(held: dict[str, Any]) -> str:
    return ", ".join(f"{part}.{k}={v}" for part, values in sorted(held.items()) for k, v in sorted(values.items()))


def summary(searches: list[Search]) -> list[str]:
    """One line per budget over its finished searches: where the winners sit, what the pruner
    stopped, how often the defaults won."""
    by_budget: dict[tuple[int, str], list[Search]] = defaultdict(list)
    for s in searches:
        if s.done:
            by_budget[(s.budget, _held(s.held))].append(s)
    lines = []
    for (budget, held), done in sorted(by_budget.items(), key=lambda kv: (-len(kv[1]), -kv[0][0], kv[0][1])):
        early = sum(s.best_trial < FIRST_DRAWS for s in done)
        pruned, trials = sum(s.pruned for s in done), sum(s.finished for s in done)
        with_defaults = [s for s in done if s.defaults_valid is not None]
        won = (f"; the model's defaults beat the search in {sum(s.defaults_won for s in with_defaults)} of "
               f"{len(with_defaults)}" if with_defaults else "; no defaults trial")
        lines.append(f"- {budget} trials, {held}: {len(done)} finished searches. In {early} of them the best "
                     f"trial is one of the first {FIRST_DRAWS}; the median pruner stopped {pruned} of their "
                     f"{trials} trials{won}.")
    return lines or ["- No search has finished yet."]


def markdown(searches: list[Search]) -> list[str]:
    """The searches table for docs/results.md (empty when there is no record)."""
    if not searches:
        return []
    lines = ["## Contest searches (`ctrserve tune`, docs/tuning)", "",
             "Per search: the settings held out of it, trials finished (pruned among them), the best "
             "trial's validation AUC, the defaults trial's, and which of the two the seeded runs use. "
             "A search with fewer trials than its budget is still running; it resumes from its record.", "",
             *summary(searches), "",
             "| dataset | model | held | trials (pruned) | best trial: valid AUC | defaults: valid AUC | chosen |",
             "|---|---|---|---|---|---|---|"]
    for s in searches:
        defaults = f"{s.defaults_valid:.4f}" if s.defaults_valid is not None else "–"
        chosen = "defaults" if s.defaults_won else (f"trial {s.best_trial}" if s.done else "searching")
        lines.append(f"| {s.dataset} | {s.model} | {_held(s.held)} | {s.finished} ({s.pruned}) | "
                     f"{s.best_trial}: {s.best_valid:.4f} | {defaults} | {chosen} |")
    return [*lines, ""]
