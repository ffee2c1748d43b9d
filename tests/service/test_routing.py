"""A/B routing: bucket math, determinism across processes, split accuracy, config validation."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ctrserve.service.routing import (
    BUCKETS,
    NotFound,
    Router,
    RoutingError,
    bucket,
    parse_yaml,
    single_arm_config,
)

pytestmark = pytest.mark.quick

CONFIG = """
experiments:
  - name: main
    salt: s1
    arms:
      - {name: control, model: m, version: 1, weight: 70}
      - {name: treatment, model: m, version: 2, weight: 30}
  - name: other
    salt: s2
    arms:
      - {name: a, model: m, version: 1, weight: 99.5}
      - {name: b, model: n, version: 3, weight: 0.5}
      - {name: qa, model: n, version: 4, weight: 0}
"""


def test_bucket_is_in_range_and_pinned() -> None:
    # pinned values (sha256 of "salt\0user", first 8 bytes big-endian, mod 10,000): changing the hash
    # would silently move every user to another arm
    assert [bucket("s1", f"user-{i}") for i in range(3)] == [1316, 3554, 7228]
    assert [bucket("s2", f"user-{i}") for i in range(3)] == [4777, 215, 1272]  # the salt reshuffles
    assert all(0 <= bucket("salt", str(i)) < BUCKETS for i in range(2000))


def test_assignment_is_the_same_in_another_process() -> None:
    """Sticky across restarts and replicas: no dependence on Python's per-process hash seed."""
    router = Router(parse_yaml(CONFIG))
    here = [router.assign(f"u{i}").arm for i in range(200)]
    code = ("from ctrserve.service.routing import Router, parse_yaml; import sys; "
            "r = Router(parse_yaml(sys.stdin.read())); print(','.join(r.assign(f'u{i}').arm for i in range(200)))")
    out = subprocess.run([sys.executable, "-c", code], input=CONFIG, capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""})
    assert out.stdout.strip().split(",") == here


def test_split_matches_weights_over_10000_users() -> None:
    router = Router(parse_yaml(CONFIG))
    arms = [router.assign(f"user-{i}").arm for i in range(10_000)]
    share = arms.count("treatment") / len(arms)
    assert abs(share - 0.30) <= 0.02, share
    other = [router.assign(f"user-{i}", "other").arm for i in range(10_000)]
    assert abs(other.count("b") / 10_000 - 0.005) <= 0.02
    assert "qa" not in other  # 0 % arms are reachable only by the override header


def test_buckets_map_to_contiguous_ranges() -> None:
    router = Router(parse_yaml(CONFIG))
    for i in range(500):
        r = router.assign(f"x{i}")
        assert r.bucket is not None
        assert r.arm == ("control" if r.bucket < 7000 else "treatment")


def test_override_and_direct_routes() -> None:
    router = Router(parse_yaml(CONFIG))
    r = router.assign("anyone", "other", arm="qa")
    assert (r.arm, r.model, r.version, r.bucket) == ("qa", "n", 4, None)
    assert router.direct("m").version == 2  # newest served version
    assert router.direct("n:3").version == 3
    with pytest.raises(NotFound, match="unknown experiment"):
        router.assign("u", "nope")
    with pytest.raises(NotFound, match="no arm 'zzz'"):
        router.assign("u", arm="zzz")
    with pytest.raises(NotFound, match="not served"):
        router.direct("unknown")
    with pytest.raises(NotFound, match="no served version '7'"):
        router.direct("m:7")


@pytest.mark.parametrize(("text", "message"), [
    ("experiments: []", "at least 1"),
    ("- a\n- b", "a mapping"),
    ("experiments: [{name: e, salt: s, arms: [{name: a, model: m, version: 1, weight: 60}]}]", "sum to 60 %"),
    ("experiments: [{name: e, salt: s, arms: [{name: a, model: m, version: 1, weight: 50},"
     " {name: a, model: m, version: 2, weight: 50}]}]", "duplicate arm names"),
    ("experiments: [{name: e, salt: s, arms: [{name: a, model: m, version: 1, weight: 100.005}]}]",
     "less than or equal to 100"),
    ("experiments: [{name: e, salt: s, arms: [{name: a, model: m, version: 1, weight: 99.995},"
     " {name: b, model: m, version: 1, weight: 0.005}]}]", "finer than one bucket"),
    ("experiments: [{name: e, salt: s, arms: [{name: a, model: m, version: 0, weight: 100}]}]", "version"),
    ("experiments: [{name: e, salt: s, arms: [{name: a, model: m, version: 1, weight: -1}]}]", "weight"),
    ("experiments: [{name: e, salt: s, arms: [{name: a, model: m, version: 1, weight: 100}]}]\ndefault: x",
     "default experiment 'x'"),
    ("experiments: [{name: e, salt: s, arms: [{name: a, model: m, version: 1, weight: 100, extra: 1}]}]",
     "Extra inputs"),
    ("experiments: [{name: e, arms: [{name: a, model: m, version: 1, weight: 100}]}]", "salt"),
    ("experiments: {", "not valid YAML"),
])
def test_bad_configs_are_rejected_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(RoutingError, match=message):
        parse_yaml(text, "test.yaml")


def test_single_arm_default() -> None:
    cfg = single_arm_config("m", 3)
    assert cfg.models() == {("m", 3)}
    assert Router(cfg).assign("whoever").arm == "default"


def test_example_config_parses() -> None:
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "deploy" / "routing.example.yaml"
    cfg = parse_yaml(example.read_text(), str(example))
    assert len(cfg.experiments) >= 1
