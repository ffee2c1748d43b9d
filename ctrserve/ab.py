"""``ctrserve ab report`` and ``ctrserve ab export``: judge an experiment's arms by outcomes and
write its served traffic as a dataset to retrain on.

Both read the closed loop's log from Redis (feature_store/feedback.py): the impression stream of
the experiment (one entry per logged scored request: items, scores, model inputs) joined with its
event stream (clicks, conversions) by request id and item. The report gives, per arm, CTR with its
95 % Wilson interval, calibration, AUC and GAUC on the joined rows; and for each arm against the
first (the control): the CTR difference with a two-proportion z-test (user-clustered errors), the AUC difference with a
95 % interval from a bootstrap over users (arms split users, so each arm's users are resampled
independently), a verdict — better, worse or not yet distinguishable — and, when undecided, how
much more traffic would make the observed difference significant at 80 % power.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import json
import math
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

Z95, Z80 = 1.959963984540054, 0.8416212335729143


@dataclass
class Log:
    """The joined impression log of one experiment: one row per scored candidate."""

    request: np.ndarray  # request index (into ``inputs``/``request_ids``)
    user: np.ndarray  # user index (into ``users``)
    arm: np.ndarray  # arm name per row
    score: np.ndarray
    clicked: np.ndarray
    ts_ms: np.ndarray
    request_ids: list[str]
    users: list[str]
    inputs: list[bytes | None]  # per request: the model inputs (.npz bytes) or None
    events: dict[str, int]  # joined events in the log by type

    def rows(self, arm: str) -> np.ndarray:
        return np.flatnonzero(self.arm == arm)

    def select(self, keep: np.ndarray) -> Log:
        """The rows where ``keep`` (a boolean per row) holds; request and user indices stay valid."""
        cols = ("request", "user", "arm", "score", "clicked", "ts_ms")
        return dataclasses.replace(self, **{c: getattr(self, c)[keep] for c in cols})

    def with_request_prefix(self, prefix: str) -> Log:
        """The rows of requests whose id starts with ``prefix`` (one replay's traffic)."""
        return self.select(np.array([self.request_ids[r].startswith(prefix) for r in self.request], dtype=bool))


async def _read(experiment: str, redis_url: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from ctrserve.feature_store.config import RedisStoreConfig
    from ctrserve.feature_store.feedback import FeedbackStore

    config = RedisStoreConfig(**({"url": redis_url} if redis_url else {}))
    store = FeedbackStore(config, 1, 1)
    try:
        log = [e async for e in store.stream(store.keys.log(experiment))]
        labels = [e async for e in store.stream(store.keys.labels(experiment))]
    finally:
        await store.close()
    return log, labels


def read_log(experiment: str, redis_url: str | None = None) -> Log:
    """The experiment's impressions joined with its clicks (``CTRSERVE_REDIS_*`` or ``redis_url``)."""
    entries, labels = asyncio.run(_read(experiment, redis_url))
    clicks = {(e["request_id"], e["item_id"]) for e in labels if e["type"] == "click"}
    users: dict[str, int] = {}
    cols: dict[str, list[Any]] = {k: [] for k in ("request", "user", "arm", "score", "clicked", "ts")}
    for i, e in enumerate(entries):
        items, scores = json.loads(e["items"]), json.loads(e["scores"])
        u = users.setdefault(e["user_id"], len(users))
        cols["request"] += [i] * len(items)
        cols["user"] += [u] * len(items)
        cols["arm"] += [e["arm"]] * len(items)
        cols["ts"] += [int(e["ts"])] * len(items)
        cols["score"] += scores
        cols["clicked"] += [(e["request_id"], item) in clicks for item in items]
    return Log(np.asarray(cols["request"], dtype=np.int64), np.asarray(cols["user"], dtype=np.int64),
               np.asarray(cols["arm"], dtype=object), np.asarray(cols["score"], dtype=np.float64),
               np.asarray(cols["clicked"], dtype=bool), np.asarray(cols["ts"], dtype=np.int64),
               [e["request_id"] for e in entries], list(users), [e.get("inputs") for e in entries],
               dict(Counter(e["type"] for e in labels)))


# -- statistics ------------------------------------------------------------------------------------
def weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    """AUC with ties counted half; ``weights``: row multiplicities (a bootstrap draw)."""
    w = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=np.float64)
    order = np.argsort(scores, kind="stable")
    s, y, w = scores[order], labels[order], w[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    pos = np.add.reduceat(w * y, starts) if len(s) else np.zeros(0)
    neg = np.add.reduceat(w * ~y, starts) if len(s) else np.zeros(0)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos <= 0 or n_neg <= 0:
        return None
    below = np.cumsum(neg) - neg
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


def gauc(scores: np.ndarray, labels: np.ndarray, users: np.ndarray) -> float | None:
    """Per-user AUC weighted by the user's rows, over users with both clicks and non-clicks."""
    total, weight = 0.0, 0
    order = np.argsort(users, kind="stable")
    bounds = np.flatnonzero(np.r_[True, users[order][1:] != users[order][:-1], True])
    for a, b in itertools.pairwise(bounds):
        rows = order[a:b]
        value = weighted_auc(scores[rows], labels[rows])
        if value is not None:
            total, weight = total + value * len(rows), weight + len(rows)
    return total / weight if weight else None


def wilson(k: float, n: float) -> tuple[float, float]:
    p, z2 = k / n, Z95 * Z95
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def arm_stats(log: Log, arm: str) -> dict[str, Any]:
    rows = log.rows(arm)
    n, k = len(rows), int(log.clicked[rows].sum())
    s, y = log.score[rows], log.clicked[rows]
    ctr = k / n if n else None
    return {"arm": arm, "requests": len(np.unique(log.request[rows])), "users": len(np.unique(log.user[rows])),
            "impressions": n, "clicks": k, "ctr": ctr, "ctr_ci95": wilson(k, n) if n else None,
            "mean_predicted": float(s.mean()) if n else None, "auc": weighted_auc(s, y) if n else None,
            "gauc": gauc(s, y, log.user[rows]) if n else None}


def _verdict(lo: float, hi: float) -> str:
    return "better" if lo > 0 else "worse" if hi < 0 else "not yet distinguishable"


def _more_traffic(diff: float, se: float) -> float | None:
    """Traffic multiple at which ``diff`` would be significant at 95 % with 80 % power (None: no difference)."""
    if diff == 0 or not math.isfinite(se):
        return None
    return ((Z95 + Z80) * se / abs(diff)) ** 2


def ctr_variance(log: Log, rows: np.ndarray) -> float:
    """Variance of an arm's CTR (clicks / impressions) with its users as clusters (delta method):
    one user's impressions are not independent (users differ in how much they click), and the
    binomial variance would call composition differences between the arms' users significant."""
    clicks = np.bincount(log.user[rows], weights=log.clicked[rows].astype(float))
    shown = np.bincount(log.user[rows]).astype(float)
    ratio = clicks.sum() / shown.sum()
    return float(((clicks - ratio * shown) ** 2).sum() / shown.sum() ** 2)


def compare_ctr(log: Log, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two-proportion z-test of ``b``'s CTR against ``a``'s, with user-clustered standard errors."""
    p1, p2 = a["clicks"] / a["impressions"], b["clicks"] / b["impressions"]
    se = math.sqrt(ctr_variance(log, log.rows(a["arm"])) + ctr_variance(log, log.rows(b["arm"]))) or float("inf")
    lo, hi = p2 - p1 - Z95 * se, p2 - p1 + Z95 * se
    return {"diff": p2 - p1, "ci95": (lo, hi), "p_value": math.erfc(abs(p2 - p1) / se / math.sqrt(2)),
            "verdict": _verdict(lo, hi), "traffic_multiple_needed": _more_traffic(p2 - p1, se)}


def _boot_auc(log: Log, rows: np.ndarray, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    users, inverse = np.unique(log.user[rows], return_inverse=True)
    out = np.empty(n_boot)
    for i in range(n_boot):
        counts = rng.multinomial(len(users), np.full(len(users), 1 / len(users)))
        out[i] = weighted_auc(log.score[rows], log.clicked[rows], counts[inverse]) or np.nan
    return out


def compare_auc(log: Log, control_rows: np.ndarray, rows: np.ndarray, seed: int = 0,
                n_boot: int = 200) -> dict[str, Any]:
    """AUC difference (``rows`` minus control) with a 95 % bootstrap interval over users."""
    rng = np.random.default_rng(seed)
    base = weighted_auc(log.score[control_rows], log.clicked[control_rows])
    other = weighted_auc(log.score[rows], log.clicked[rows])
    if base is None or other is None:
        return {"diff": None, "ci95": None, "verdict": "not yet distinguishable", "traffic_multiple_needed": None}
    diffs = _boot_auc(log, rows, rng, n_boot) - _boot_auc(log, control_rows, rng, n_boot)
    diffs = diffs[np.isfinite(diffs)]
    lo, hi = (float(q) for q in np.quantile(diffs, [0.025, 0.975]))
    return {"diff": other - base, "ci95": (lo, hi), "verdict": _verdict(lo, hi),
            "traffic_multiple_needed": _more_traffic(other - base, float(diffs.std()))}


def report(log: Log, arms: list[str], seed: int = 0, n_boot: int = 200) -> dict[str, Any]:
    """Every arm's figures, and each arm after the first compared with the first."""
    stats = {a: arm_stats(log, a) for a in arms}
    comparisons = {}
    for arm in arms[1:]:
        if stats[arm]["impressions"] and stats[arms[0]]["impressions"]:
            comparisons[arm] = {"ctr": compare_ctr(log, stats[arms[0]], stats[arm]),
                                "auc": compare_auc(log, log.rows(arms[0]), log.rows(arm), seed, n_boot)}
    return {"control": arms[0], "arms": stats, "comparisons": comparisons}


def aa_check(log: Log, arm: str, salts: int = 20, n_boot: int = 200) -> list[str]:
    """A/A: one arm's users re-split in two halves by ``salts`` different salted hashes; the AUC
    verdict of each split (a sound test says "not yet distinguishable" in about 95 % of them)."""
    rows = log.rows(arm)
    verdicts = []
    for salt in range(salts):
        half = np.array([hashlib.sha256(f"aa{salt}\0{log.users[u]}".encode()).digest()[0] & 1
                         for u in range(len(log.users))], dtype=bool)
        side = half[log.user[rows]]
        verdicts.append(compare_auc(log, rows[~side], rows[side], seed=salt, n_boot=n_boot)["verdict"])
    return verdicts


def format_report(rep: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.3f} %"

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    lines = [f"{'arm':<14}{'impr.':>10}{'clicks':>9}{'CTR':>11}  {'CTR 95 % CI':<22}{'mean pred':>11}"
             f"{'AUC':>9}{'GAUC':>9}"]
    for s in rep["arms"].values():
        ci = "-" if s["ctr_ci95"] is None else f"[{pct(s['ctr_ci95'][0])}, {pct(s['ctr_ci95'][1])}]"
        lines.append(f"{s['arm']:<14}{s['impressions']:>10,}{s['clicks']:>9,}{pct(s['ctr']):>11}  {ci:<22}"
                     f"{pct(s['mean_predicted']):>11}{num(s['auc']):>9}{num(s['gauc']):>9}")
    for arm, c in rep["comparisons"].items():
        for metric, cmp_ in c.items():
            if cmp_["diff"] is None:
                lines.append(f"{arm} vs {rep['control']}, {metric}: no data yet")
                continue
            fmt = pct if metric == "ctr" else num
            more = cmp_["traffic_multiple_needed"]
            extra = "" if cmp_["verdict"] != "not yet distinguishable" else (
                " (no difference observed)" if more is None else
                f" (about {max(more, 1.0):.1f}x the traffic so far would show a difference this size)")
            p = f", p = {cmp_['p_value']:.3g}" if "p_value" in cmp_ else ""
            lines.append(f"{arm} vs {rep['control']}, {metric}: {fmt(cmp_['diff'])} "
                         f"[{fmt(cmp_['ci95'][0])}, {fmt(cmp_['ci95'][1])}]{p} -> {cmp_['verdict']}{extra}")
    return "\n".join(lines)


# -- export ----------------------------------------------------------------------------------------
def export_prepared(log: Log, like: Path, out: Path, valid_share: float = 0.1,
                    test_share: float = 0.1) -> dict[str, int]:
    """The logged requests as a prepared dataset (``like``'s feature map and vocabulary): each
    row is what the model saw when it scored the candidate, labelled by the joined click; split
    by time (oldest to train). Requests logged without inputs are skipped. Returns rows per split."""
    from ctrserve.contract.feature_map import FeatureMap
    from ctrserve.contract.prepared import FEATURE_MAP_FILE, USER_KEY, VOCAB_FILE
    from ctrserve.service.impressions import decode_inputs

    fmap = FeatureMap.load(Path(like) / FEATURE_MAP_FILE)
    names = [f.name for f in fmap.features]
    requests = [r for r in range(len(log.inputs)) if log.inputs[r] is not None]  # the stream's (time) order
    bounds = np.searchsorted(log.request, np.arange(len(log.inputs) + 1))  # a request's rows are contiguous
    cut1 = int(len(requests) * (1 - valid_share - test_share))
    cut2 = int(len(requests) * (1 - test_share))
    out.mkdir(parents=True, exist_ok=True)
    for name in (FEATURE_MAP_FILE, VOCAB_FILE):
        shutil.copyfile(Path(like) / name, out / name)
    counts = {}
    for split, part in (("train", requests[:cut1]), ("valid", requests[cut1:cut2]), ("test", requests[cut2:])):
        cols: dict[str, list[np.ndarray]] = {n: [] for n in [*names, fmap.label, USER_KEY]}
        for r in part:
            rows = np.arange(bounds[r], bounds[r + 1])
            z = decode_inputs(log.inputs[r])
            for n in names:
                arr = z[n]
                cols[n].append(np.repeat(arr, len(rows), axis=0) if arr.shape[0] == 1 else arr)
            cols[fmap.label].append(log.clicked[rows].astype(np.float32))
            cols[USER_KEY].append(log.user[rows])
        arrays = {n: np.concatenate(v) if v else np.zeros(0) for n, v in cols.items()}
        np.savez(out / f"{split}.npz", **arrays)
        counts[split] = len(arrays[fmap.label])
    return counts


# -- commands --------------------------------------------------------------------------------------
ab_app = typer.Typer(help="Judge A/B arms by outcomes and export served traffic (the closed loop).",
                     no_args_is_help=True)
RedisUrl = Annotated[str | None, typer.Option(help="Redis holding the log [CTRSERVE_REDIS_URL]")]


@ab_app.command("report")
def report_cmd(experiment: Annotated[str, typer.Argument(help="experiment name (routing config)")],
               arms: Annotated[str | None, typer.Option(help="arms in order, control first (default: as logged)")]
               = None, redis_url: RedisUrl = None, seed: int = 0,
               json_out: Annotated[Path | None, typer.Option("--json", help="also write the report as JSON")] = None,
               ) -> None:
    """Per-arm CTR (95 % CI), calibration, AUC and GAUC; each arm against the first: CTR difference
    (two-proportion test) and AUC difference (bootstrap over users), with a verdict."""
    log = read_log(experiment, redis_url)
    names = arms.split(",") if arms else list(dict.fromkeys(log.arm.tolist()))
    if not names:
        typer.echo(f"no logged requests for experiment {experiment!r}", err=True)
        raise typer.Exit(1)
    rep = report(log, names, seed)
    typer.echo(format_report(rep))
    if json_out is not None:
        json_out.write_text(json.dumps(rep, indent=1))


@ab_app.command("export")
def export_cmd(experiment: Annotated[str, typer.Argument(help="experiment name (routing config)")],
               out: Annotated[Path, typer.Option(help="directory of the prepared dataset to write")],
               like: Annotated[Path, typer.Option(help="the prepared dataset the served models were trained on "
                                                       "(its feature map and vocabulary are copied)")],
               redis_url: RedisUrl = None) -> None:
    """The joined log as a prepared dataset (train/valid/test by time) that `ctrserve train` reads."""
    counts = export_prepared(read_log(experiment, redis_url), like, out)
    typer.echo(f"wrote {out}: " + ", ".join(f"{k} {v:,} rows" for k, v in counts.items()))
