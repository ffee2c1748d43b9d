"""Locust traffic for the scoring gateway (and, with ``--mode baseline``, the eager FastAPI baseline).

    locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 30s --host http://127.0.0.1:8000 \
        --pool work/bench/pool.json --candidates uniform:50:500

Users are drawn Zipf-like from the pool's users (written by ``ctrserve bench load`` from the
loaded feature store), candidate counts from ``--candidates``; bodies are built once per
(user, candidate count) and reused (traffic.py). Requests are named per A/B arm, read from the
response (``/v1/score [control]``). Each response is checked: status, one score per candidate,
scores in [0, 1]. ``--target-rps`` paces the users to a total request rate (0: closed loop, as
fast as answers come). ``--samples-out`` writes every request's (time, ms, candidates, ok) as
``.npz`` when the test stops: Locust's own percentiles are rounded to whole milliseconds.
``--click-rate R`` makes each user click a share R of the candidates it was shown and send the
clicks to ``POST /v1/events`` in one batch per ``--events-every`` scoring calls (a batch that fails
is sent again, same event ids, with the next one); ``--events-out`` writes the events sent and
acknowledged (JSON) when the test stops, to compare with the gateway's counts.
Every option also has an environment variable (``CTRSERVE_LOAD_*``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, ClassVar

import gevent
import numpy as np
import orjson
from locust import FastHttpUser, events, task
from locust.env import Environment

from ctrserve.loadtests.traffic import Bodies, CandidateDist, Pacer, Pool, ZipfSampler, check_response

HEADERS = {"Content-Type": "application/json"}
PATHS = {"gateway": "/v1/score", "baseline": "/predict"}


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("ctrserve")
    group.add_argument("--pool", default="", env_var="CTRSERVE_LOAD_POOL", help="pool JSON (users, items)")
    group.add_argument("--candidates", default="uniform:50:500", env_var="CTRSERVE_LOAD_CANDIDATES",
                       help="candidates per request: uniform:LO:HI, fixed:N, choice:A,B")
    group.add_argument("--zipf", type=float, default=1.1, env_var="CTRSERVE_LOAD_ZIPF",
                       help="Zipf exponent of user activity (0: uniform)")
    group.add_argument("--mode", default="gateway", choices=["gateway", "baseline"], env_var="CTRSERVE_LOAD_MODE",
                       help="gateway (/v1/score, raw ids) or baseline (/predict, encoded features)")
    group.add_argument("--target-rps", type=float, default=0.0, env_var="CTRSERVE_LOAD_TARGET_RPS",
                       help="total request rate to pace the users to (0: closed loop)")
    group.add_argument("--samples-out", default="", env_var="CTRSERVE_LOAD_SAMPLES",
                       help="write per-request samples (.npz) here at test stop")
    group.add_argument("--traffic-seed", type=int, default=0, env_var="CTRSERVE_LOAD_SEED", help="traffic seed")
    group.add_argument("--click-rate", type=float, default=0.0, env_var="CTRSERVE_LOAD_CLICK_RATE",
                       help="share of shown candidates clicked and sent to /v1/events (0: no events)")
    group.add_argument("--events-every", type=int, default=5, env_var="CTRSERVE_LOAD_EVENTS_EVERY",
                       help="one /v1/events batch per this many scoring calls of a user")
    group.add_argument("--events-out", default="", env_var="CTRSERVE_LOAD_EVENTS_OUT",
                       help="write the events sent and acknowledged (JSON) here at test stop")


class _State:
    bodies: Bodies | None = None
    dist: CandidateDist | None = None
    samples: ClassVar[list[tuple[float, float, int, bool]]] = []
    user_seq = 0
    #: events: distinct ids sent, and acknowledged (answered accepted or duplicate)
    events: ClassVar[dict[str, int]] = {"sent": 0, "acknowledged": 0, "accepted": 0, "failed_batches": 0}


@events.init.add_listener
def _init(environment: Environment, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is None:  # imported as a library: nothing to set up
        return
    if not opts.pool:
        raise SystemExit("locustfile: --pool (or CTRSERVE_LOAD_POOL) is required")
    _State.dist = CandidateDist.parse(opts.candidates)
    _State.bodies = Bodies(Pool.load(opts.pool), _State.dist.max, opts.mode, opts.traffic_seed)


@events.request.add_listener
def _record(response_time: float, exception: Any, context: dict | None = None, **_: Any) -> None:
    n = int((context or {}).get("candidates", 0))
    _State.samples.append((time.time(), float(response_time), n, exception is None))


@events.test_stop.add_listener
def _write(environment: Environment, **_: Any) -> None:
    events_out = getattr(environment.parsed_options, "events_out", "")
    if events_out:
        Path(events_out).write_text(json.dumps(_State.events))
    out = getattr(environment.parsed_options, "samples_out", "")
    if out and _State.samples:
        a = np.asarray(_State.samples, dtype=np.float64)
        np.savez(out, t=a[:, 0], ms=a[:, 1], candidates=a[:, 2].astype(np.int32), ok=a[:, 3].astype(bool))


class ScoreUser(FastHttpUser):
    """One simulated client: draws a user and a candidate count per request."""

    connection_timeout = 10.0
    network_timeout = 30.0

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        _State.user_seq += 1
        self.rng = np.random.default_rng((opts.traffic_seed, _State.user_seq))
        assert _State.bodies is not None
        self.users = ZipfSampler(len(_State.bodies.pool.users), opts.zipf, self.rng)
        self.path = PATHS[opts.mode]
        self.pending: list[dict[str, str]] = []  # clicks not yet acknowledged by /v1/events
        self.calls = 0
        # pacing (traffic.Pacer): one request per period and user, N users together target_rps requests/s
        self.pacer: Pacer | None = None
        if opts.target_rps > 0:
            self.pacer = Pacer(opts.num_users / opts.target_rps, self.rng, time.perf_counter())
            gevent.sleep(self.pacer.first_delay())

    def wait_time(self) -> float:
        return 0.0 if self.pacer is None else self.pacer.next_delay(time.perf_counter())

    @task
    def score(self) -> None:
        assert _State.bodies is not None and _State.dist is not None
        n = _State.dist.sample(self.rng)
        body = _State.bodies.get(self.users.sample(), n)
        with self.client.post(self.path, data=body, headers=HEADERS, name=self.path, catch_response=True,
                              context={"candidates": n}) as resp:
            error, arm = check_response(resp.status_code or 0, resp.content, n)
            if arm == "?":  # error bodies carry no arm; a gateway that sets the header names it anyway
                arm = (resp.headers or {}).get("x-ctrserve-arm", "?")
            resp.request_meta["name"] = f"{self.path} [{arm}]"  # stats per A/B arm
            if error:
                resp.failure(error)
            else:
                resp.success()
        if not error and opts_click_rate(self) > 0:
            self.clicks(resp.content, body_user_items(body), n)

    # -- clicks (``--click-rate``) -------------------------------------------------------------
    def clicks(self, content: bytes, items: list[str], n: int) -> None:
        opts = self.environment.parsed_options
        rid = orjson.loads(content)["request_id"]
        for k in np.flatnonzero(self.rng.random(n) < opts.click_rate).tolist():
            self.pending.append({"event_id": f"{rid}:{k}", "request_id": rid, "item_id": items[k], "type": "click"})
            _State.events["sent"] += 1
        self.calls += 1
        if self.calls % opts.events_every == 0 and self.pending:
            with self.client.post("/v1/events", data=orjson.dumps({"events": self.pending}), headers=HEADERS,
                                  name="/v1/events", catch_response=True) as resp:
                if resp.status_code == 200:
                    answer = orjson.loads(resp.content)
                    _State.events["acknowledged"] += answer["accepted"] + answer["duplicate"]
                    _State.events["accepted"] += answer["accepted"]
                    self.pending = []
                    resp.success()
                else:  # kept: the next batch sends them again, with the same ids
                    _State.events["failed_batches"] += 1
                    resp.failure(f"events: HTTP {resp.status_code}")


def opts_click_rate(user: ScoreUser) -> float:
    return float(getattr(user.environment.parsed_options, "click_rate", 0.0) or 0.0)


def body_user_items(body: bytes) -> list[str]:
    """The candidates' item ids of a gateway body (in order)."""
    return [c["item_id"] for c in orjson.loads(body)["candidates"]]
