"""``ctrserve bench ab``: the closed loop proved on a replay (loadtests/replay.py).

Two models trained on the synthetic data (a stale logistic regression as control, DeepFM as
treatment) serve a 50/50 experiment; the test split is replayed through the gateway with its
labels as clicks (one event batch per five users' requests). Recorded: each arm's online AUC
(the gateway's histograms) and offline AUC (the PyTorch model on the same rows), the report's
verdict on the AUC difference, events lost, an A/A check (the control arm's users re-split by 20
salts, offline from the same log), and the impression log's overhead: the e2e p50 of one
sequential client alternating between two gateways on the same Redis, one logging and one not.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

ROUTING = """experiments:
  - name: ab
    salt: ab-replay
    arms:
      - {name: control, model: lr, version: 1, weight: 50}
      - {name: treatment, model: deepfm, version: 1, weight: 50}
"""
MODELS = {"control": "lr", "treatment": "deepfm"}
#: how each arm's model is trained: the control is a stale model (one epoch at a small learning
#: rate), so that the arms differ by a known amount and the verdict can be checked against it
TRAIN = {"control": ("ab-stale", {"train": {"max_epochs": 1, "lr": 3e-4}}),
         "treatment": ("ab", {"train": {"max_epochs": 4, "lr": 2e-3}})}
#: the synthetic dataset at its spec's size (200,000 rows, 20,000 users): a 20,000-row test split
AB_DATA: dict[str, int] = {}
PLOT = Path("docs") / "ab_replay.png"


def _runs(prepared: Path, work: Path) -> dict[str, Path]:
    """Each arm's model trained on ``prepared`` (the newest finished run reused)."""
    from ctrserve.models.train.config import resolve_config
    from ctrserve.models.train.trainer import train

    runs = {}
    for arm, model in MODELS.items():
        variant, overrides = TRAIN[arm]
        done = [r for r in sorted((work / "runs" / "synthetic" / model).glob(f"{variant}-s1-*"))
                if (r / "metrics.json").exists() and (r / "model.pt").exists()]
        if done:
            runs[arm] = done[-1]
            continue
        cfg = resolve_config(model, "synthetic", overrides=overrides, seed=1, variant=variant)
        runs[arm] = train(cfg, prepared, work / "runs", command="ctrserve bench ab", progress=False).run_dir
    return runs


def _overhead_ms(on: str, off: str, users: list, n: int) -> tuple[float, float]:
    """e2e p50 (ms) of the same requests sent alternately to the logging and the silent gateway."""
    import httpx

    from .harness import p50

    bodies = [r.body for group in users for r in group][:n]
    times: dict[str, list[float]] = {on: [], off: []}
    with httpx.Client(timeout=30) as client:
        for k, body in enumerate(bodies * 2):
            for url in (on, off) if k % 2 else (off, on):
                t0 = time.perf_counter()
                assert client.post(url + "/v1/score", json=body).status_code == 200
                times[url].append((time.perf_counter() - t0) * 1000)
    return p50(times[on]), p50(times[off])


async def _scoring_beside_events(url: str, users: list, n: int, block: int = 50) -> tuple[float, float]:
    """Scoring p50 (ms) of one sequential client in alternating blocks of ``block`` requests:
    alone, then beside a second client posting one event batch (20 ``impression`` events on the
    replay's requests) per five scoring calls. Returns (p50 alone, p50 beside events)."""
    import httpx

    from .harness import p50

    bodies = [r.body for group in users for r in group]
    times: dict[bool, list[float]] = {False: [], True: []}
    due = asyncio.Queue[int]()

    async def events(client: httpx.AsyncClient) -> None:
        sent = 0
        while True:
            await due.get()
            batch = [{"event_id": f"load-{sent}-{k}", "request_id": f"replay-{(sent * 20 + k) % len(bodies)}",
                      "item_id": bodies[(sent * 20 + k) % len(bodies)]["candidates"][0]["item_id"],
                      "type": "impression"} for k in range(20)]
            sent += 1
            await client.post("/v1/events", json={"events": batch})

    async with httpx.AsyncClient(base_url=url, timeout=30) as client, \
            httpx.AsyncClient(base_url=url, timeout=30) as side:
        sender = asyncio.create_task(events(side))
        for k in range(2 * n):
            beside = (k // block) % 2 == 1
            t0 = time.perf_counter()
            assert (await client.post("/v1/score", json=bodies[k % len(bodies)])).status_code == 200
            times[beside].append((time.perf_counter() - t0) * 1000)
            if beside and k % 5 == 0:
                due.put_nowait(k)
        sender.cancel()
    return p50(times[False]), p50(times[True])


def _plot(snapshots: list[tuple[int, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    snapshots = sorted(snapshots, key=lambda snap: snap[0])  # workers take snapshots concurrently
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for arm in MODELS:
        xs = [n for n, s in snapshots if s["arms"][arm]["auc"] is not None]
        ax1.plot(xs, [s["arms"][arm]["ctr"] for n, s in snapshots if s["arms"][arm]["auc"] is not None],
                 label=f"{arm} ({MODELS[arm]})")
        ax2.plot(xs, [s["arms"][arm]["auc"] for n, s in snapshots if s["arms"][arm]["auc"] is not None],
                 label=f"{arm} ({MODELS[arm]})")
    for ax, title in ((ax1, "CTR"), (ax2, "online AUC")):
        ax.set_xlabel("users replayed")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("ctrserve bench ab: per-arm outcomes over the replay (GET /v1/experiments/ab)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def ab_cmd(
    concurrency: Annotated[int, typer.Option(help="users replayed at a time")] = 4,
    overhead_requests: Annotated[int, typer.Option(help="requests per gateway for the log's overhead")] = 500,
    record: Annotated[bool, typer.Option(help="write docs/benchmarks.json/.md and the plot")] = True,
) -> None:
    """Replay the synthetic test split through two arms with its labels as clicks; check the loop."""
    from ctrserve.ab import aa_check, format_report
    from ctrserve.feature_store.config import RedisStoreConfig
    from ctrserve.feature_store.loader import load_prepared
    from ctrserve.launch import Launcher, start_gateway, start_redis
    from ctrserve.models.cli import ensure_prepared
    from ctrserve.paths import REPO_ROOT

    from .replay import evaluate, replay, replay_requests
    from .workload import bench_dir, ensure_export

    work = bench_dir() / "ab"
    prepared = ensure_prepared("synthetic", AB_DATA)
    runs = _runs(prepared, work)
    repo = work / "model_repository"
    for arm, model in MODELS.items():
        ensure_export(runs[arm], repo, model)
    routing = work / "routing.yaml"
    routing.write_text(ROUTING)
    users = replay_requests(prepared)
    with Launcher(work / "processes") as launcher:
        redis = start_redis(launcher)
        asyncio.run(load_prepared(prepared, RedisStoreConfig(url=redis.url)))
        quiet = {"CTRSERVE_SERVER_ACCESS_LOG": "false", "CTRSERVE_SERVER_LOG_LEVEL": "warning"}
        gw = start_gateway(launcher, repo, redis.url, routing=routing, env=quiet, ready_timeout=180)
        t0 = time.perf_counter()
        result = asyncio.run(replay(gw.url, users, "ab", concurrency=concurrency, snapshot_every=250))
        replay_s = time.perf_counter() - t0
        fig = evaluate(gw.url, users, result, "ab", runs, prepared, redis.url)
        silent = start_gateway(launcher, repo, redis.url, routing=routing, name="gateway-nolog",
                               env={**quiet, "CTRSERVE_FEEDBACK_ENABLED": "false"}, ready_timeout=180)
        p50_on, p50_off = _overhead_ms(gw.url, silent.url, users, overhead_requests)
        alone, beside = asyncio.run(_scoring_beside_events(gw.url, users, overhead_requests))
    aa = aa_check(fig["log"], "control", salts=20)
    aa_share = aa.count("not yet distinguishable") / len(aa)
    typer.echo(format_report(fig["report"]))
    for arm, f in fig["arms"].items():
        typer.echo(f"{arm}: online AUC {f['online_auc']:.4f}, offline AUC {f['offline_auc']:.4f} on {f['rows']:,} rows")
    typer.echo(f"events {fig['events']}, lost {fig['events_lost']}; A/A not distinguishable in {aa_share:.0%} of "
               f"20 salts; e2e p50 {p50_on:.3f} ms logging vs {p50_off:.3f} ms not; scoring p50 {alone:.3f} ms "
               f"alone vs {beside:.3f} ms beside event batches; replay {replay_s:.1f} s")
    if not record:
        return
    _plot(result.snapshots, REPO_ROOT / PLOT)
    timing = {"replay_s": replay_s, "p50_on": p50_on, "p50_off": p50_off, "alone": alone, "beside": beside}
    _record(fig, runs, users, prepared, timing, aa_share, concurrency)


def _record(fig: dict[str, Any], runs: dict[str, Path], users: list, prepared: Path, timing: dict[str, float],
            aa_share: float, concurrency: int) -> None:
    """The replay's figures into docs/benchmarks.json and .md (section ``ab``)."""
    from .harness import machine_facts
    from .report import record_section, write_markdown

    replay_s, p50_on, p50_off = timing["replay_s"], timing["p50_on"], timing["p50_off"]
    alone, beside = timing["alone"], timing["beside"]
    cmp_auc = fig["report"]["comparisons"]["treatment"]["auc"]
    figures: dict[str, tuple[Any, str]] = {}
    for arm, f in fig["arms"].items():
        figures[f"ab_online_auc_{arm}"] = (round(f["online_auc"], 4), f"{arm} ({MODELS[arm]}): AUC from the "
                                           "gateway's per-arm score histograms after the replay")
        figures[f"ab_offline_auc_{arm}"] = (round(f["offline_auc"], 4), f"{arm}: the PyTorch model's AUC on the "
                                            f"same {f['rows']:,} test rows")
    figures.update({
        "ab_auc_diff": (round(cmp_auc["diff"], 4), "treatment - control AUC on the exported log"),
        "ab_verdict": (cmp_auc["verdict"], "`ctrserve ab report`'s verdict on the AUC difference (bootstrap over "
                                           "users, 95 %)"),
        "ab_aa_not_distinguishable_share": (aa_share, "A/A: share of 20 salted re-splits of the control arm's "
                                                      "users called 'not yet distinguishable'"),
        "events_lost": (fig["events_lost"], f"events accepted ({fig['events']['accepted']:,}) minus those in the "
                                            "log and in the shared counters"),
        "ab_impression_log_overhead_ms": (round(p50_on - p50_off, 3), f"e2e p50 with the log ({p50_on:.3f} ms) minus "
                                                                    f"without ({p50_off:.3f} ms), same run"),
        "scoring_beside_events_ms": (round(beside - alone, 3), f"scoring p50 beside one 20-event batch per five "
                                                               f"calls ({beside:.3f} ms) minus alone ({alone:.3f} ms), "
                                                               "alternating blocks of 50, same run"),
    })
    test_auc = {arm: json.loads((runs[arm] / "metrics.json").read_text())["auc"] for arm in MODELS}
    notes = [f"Control = lr trained stale (1 epoch, lr 3e-4; test AUC {test_auc['control']:.4f}), treatment = "
             f"deepfm (4 epochs, lr 2e-3; test AUC {test_auc['treatment']:.4f}), on synthetic at its spec's size "
             f"({prepared.name}); {sum(len(g) for g in users):,} requests for {len(users):,} users, "
             f"replayed in {replay_s:.1f} s with {concurrency} users at a time.",
             f"Plot: {PLOT} (per-arm CTR and online AUC over the replay)."]
    data = record_section("ab", "Closed loop: A/B replay with clicks", "ctrserve bench ab", figures, notes,
                          machine_facts())
    write_markdown("ab", data)
