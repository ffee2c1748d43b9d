"""The msgspec decoder of ``POST /v1/score`` bodies (``request.fast_decode``) against the
pydantic path it stands in front of: it accepts nothing pydantic rejects, gives the same values
(and types) for what it accepts, and the gateway answers every request the same with either
decoder."""

from __future__ import annotations

import json
import typing
from typing import Any

import pytest
from gateway_toy import running
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_score_answers import CASES, KEY_CASES

from ctrserve.service import request as rq

pytestmark = pytest.mark.quick
CT = "application/json"
BODY = {"user_id": "u1", "context": {"device": 1, "hour": 9},
        "candidates": [{"item_id": "10"}, {"item_id": "12", "features": {"price": 3.0}}, {"item_id": "11"}]}


def _typed(v: Any) -> Any:
    """Values with their types (1 and 1.0 and True differ)."""
    if isinstance(v, dict):
        return {k: _typed(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_typed(x) for x in v]
    return type(v).__name__, v


def _pydantic(raw: bytes) -> rq.ScoreRequest | Exception:
    try:
        return rq.validate_score_request(rq.decode_body(raw, CT, fast=False), CT)
    except Exception as exc:  # the GatewayError/HTTPException pydantic's path answers with
        return exc


def _agree(raw: bytes) -> bool:
    """Whether msgspec took the body; fails when it accepts what pydantic rejects, or differs."""
    fast = rq.fast_decode(raw)
    if fast is None:
        return False
    slow = _pydantic(raw)
    assert isinstance(slow, rq.ScoreRequest), (raw[:300], slow)
    assert _typed(fast.model_dump()) == _typed(slow.model_dump()), raw[:300]
    assert fast.item_ids == slow.item_ids and fast.candidate_features == slow.candidate_features
    return True


def test_the_mirror_has_the_fields_of_the_request() -> None:
    assert set(rq._FastRequest.__struct_fields__) == set(rq.ScoreRequest.model_fields)
    assert set(rq._FastCandidate.__struct_fields__) == set(typing.get_type_hints(rq.Candidate))


def test_a_plain_body_takes_the_fast_path() -> None:
    raw = json.dumps(BODY).encode()
    assert _agree(raw)
    assert _agree(json.dumps({**BODY, "request_id": "r-1", "model": "toy:2", "context": None}).encode())
    assert rq.read_keys(rq.decode_body(raw, CT), 3) == ("u1", ["10", "12", "11"], None)
    assert rq.read_keys(rq.decode_body(raw, CT), 2) is None  # over the limit: validation answers


@pytest.mark.parametrize("patch", [
    {"user_id": 7}, {"candidates": [{"item_id": 10}]}, {"candidates": [{"item_id": "1", "x": 1}]},
    {"request_id": "abc\n"}, {"model": "toy:1\n"}, {"request_id": "a b"}, {"context": {"a": {"b": 1}}},
    {"context": {"": 1}}, {"candidates": []}, {"extra": 1}, {"user_id": "x" * 257},
])
def test_what_pydantic_coerces_or_rejects_takes_the_pydantic_path(patch: dict[str, Any]) -> None:
    assert rq.fast_decode(json.dumps({**BODY, **patch}).encode()) is None


@pytest.mark.parametrize("raw", [b'{"user_id": "u1", "candidates": [{"item_id": "1"}], "context": {"a": 1e400}}',
                                 b'{"user_id": "\xff", "candidates": [{"item_id": "1"}]}', b"\xef\xbb\xbf{}",
                                 b'{"user_id": "\\ud800", "candidates": [{"item_id": "1"}]}', b"[1]", b"{"])
def test_bytes_msgspec_cannot_take_go_to_the_pydantic_path(raw: bytes) -> None:
    assert rq.fast_decode(raw) is None


def test_the_recorded_bodies_agree() -> None:
    for _, body, _ in CASES + KEY_CASES:
        if body:
            _agree(body)


def _mostly(valid: list[Any], invalid: list[Any]) -> st.SearchStrategy[Any]:
    """Valid values most of the time (a body is accepted only when all its parts are)."""
    return st.sampled_from(valid * 6 + invalid)


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**80, max_value=2**80),
                     st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=4),
                     st.sampled_from(["a\n", "é", "😀", "x" * 129]))
_NAMES = _mostly(["a", "price", "k" * 128, "é" * 128, "😀" * 128], ["", "k" * 129, "😀" * 129])
_VALUES = st.one_of(_SCALARS, _SCALARS, _SCALARS, st.lists(_SCALARS, max_size=3),
                    _mostly([[]], [[1] * 1001, {"a": 1}]))
_FEATURES = st.one_of(st.none(), st.dictionaries(_NAMES, _VALUES, max_size=3))
_IDS = _mostly(["1", "u1", "x" * 256, "😀" * 256, "é"], ["", "x" * 257, "😀" * 257, 7])
_CANDIDATE = st.one_of(st.fixed_dictionaries({"item_id": _IDS}),
                       st.fixed_dictionaries({"item_id": _IDS, "features": _FEATURES}),
                       st.fixed_dictionaries({"item_id": _IDS}, optional={"features": _FEATURES, "score": _SCALARS}))
_BODIES = st.fixed_dictionaries(
    {"user_id": _IDS, "candidates": st.lists(_CANDIDATE, min_size=1, max_size=3) | st.just([])},
    optional={"context": _FEATURES,
              "request_id": _mostly([None, "abc", "x" * 128, "~!"], ["", "a b", "x" * 129, "abc\n", "é"]),
              "model": _mostly([None, "m", "m:1", "m" * 128, "m.v-2_x:123456789"],
                               ["m:1\n", "m\n", "_m", "m:1234567890", "m" * 129]),
              "extra": _SCALARS})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_BODIES, ascii_only=st.booleans())
def test_msgspec_accepts_only_what_pydantic_accepts_with_the_same_values(body: dict, ascii_only: bool) -> None:
    _agree(json.dumps(body, ensure_ascii=ascii_only).encode())


async def _answers(settings_: Any, bodies: list[bytes]) -> list[Any]:
    out = []
    async with running(settings_) as (client, _, _):
        for i, body in enumerate(bodies):
            r = await client.post("/v1/score", content=body, headers={"content-type": CT, "x-request-id": f"r{i}"})
            out.append((r.status_code, r.json(), {k: v for k, v in r.headers.items() if k.startswith("x-")}))
    return out


async def test_the_gateway_answers_the_same_with_either_decoder(make_settings) -> None:
    bodies = [json.dumps(b).encode() for b in (
        BODY, {**BODY, "request_id": "abc-1"}, {**BODY, "model": "toy:1"}, {**BODY, "model": "nope"},
        {**BODY, "context": {"nope": 1}}, {**BODY, "context": {"age": "old"}}, {**BODY, "candidates": [BODY] * 4},
        {**BODY, "context": {f"k{i}": 1 for i in range(9)}}, {**BODY, "user_id": "u9"},
        {**BODY, "candidates": [{"item_id": "99", "features": {"price": None}}]})]
    assert all(rq.fast_decode(b) is not None for b in bodies[:3])
    fast = await _answers(make_settings(max_candidates=3, max_feature_keys=8, decoder="msgspec"), bodies)
    slow = await _answers(make_settings(max_candidates=3, max_feature_keys=8, decoder="pydantic"), bodies)
    assert fast == slow
    assert {s for s, _, _ in fast} >= {200, 404, 422}


async def test_the_setting_chooses_the_decoder(make_settings, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = rq.fast_decode

    def counted(raw: bytes) -> rq.ScoreRequest | None:
        calls.append(raw)
        return real(raw)

    monkeypatch.setattr(rq, "fast_decode", counted)
    for decoder, expected in (("msgspec", 1), ("pydantic", 0)):
        calls.clear()
        async with running(make_settings(decoder=decoder)) as (client, _, _):
            r = await client.post("/v1/score", content=json.dumps(BODY).encode(), headers={"content-type": CT})
        assert r.status_code == 200 and len(calls) == expected, decoder
