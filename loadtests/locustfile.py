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
Every option also has an environment variable (``CTRSERVE_LOAD_*``).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import gevent
import numpy as np
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


class _State:
    bodies: Bodies | None = None
    dist: CandidateDist | None = None
    samples: ClassVar[list[tuple[float, float, int, bool]]] = []
    user_seq = 0


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
