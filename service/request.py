"""The scoring request and response: their models (which the OpenAPI schema is generated from)
and the one decoder every ``POST /v1/score`` goes through.

Decoding runs in two halves because the checks answer in a fixed order — the body is JSON (400),
then the gateway is ready (503) and the API key is right (401, both in ``api``), then the body is
a valid request (422). JSON is decoded only under an ``application/json`` (or ``+json``) content
type, with the stdlib ``json`` (orjson reads integers beyond 64 bits as floats, which would change
numeric ids coerced to strings); anything else fails validation as "not a JSON object".

A JSON body is first given to msgspec (``fast_decode``: compiled parsing and validation in one
pass, about half the CPU of ``json`` + pydantic; docs/decisions.md, "Score bodies decode with
msgspec first"), whose types mirror ``ScoreRequest`` but accept less: string ids only, no
numbers as strings, strict UTF-8. What it accepts pydantic would accept too, with the same
values; anything it rejects takes the path above, so every error answer (and every coercion)
comes from pydantic as before. ``CTRSERVE_API_DECODER=pydantic`` turns it off.

Adding a request field: declare it on ``ScoreRequest``, use it in ``assemble.Assembler``, test it.
"""

from __future__ import annotations

import email.message
import functools
import json
from collections.abc import Sequence
from typing import Annotated, Any, NotRequired

import msgspec
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
    ValidationError,
)
from starlette.exceptions import HTTPException
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from .errors import GatewayError
from .settings import ApiSettings

Id = Annotated[str, StringConstraints(min_length=1, max_length=256)]
FeatureName = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Scalar = StrictStr | StrictInt | StrictFloat | StrictBool | None
#: a raw value as in the dataset; a list (most recent first) for a behaviour-sequence field
FeatureValue = Scalar | Annotated[list[Scalar], Field(max_length=1000)]
ModelSpec = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}(:[0-9]{1,9})?$")]


class Candidate(TypedDict):
    """A TypedDict, not a BaseModel: the same validation and schema, but validated candidates stay
    dicts — no model object built per candidate (docs/decisions.md, "Gateway CPU per request:
    candidates as TypedDicts")."""

    __pydantic_config__ = ConfigDict(extra="forbid", coerce_numbers_to_str=True, allow_inf_nan=False)  # type: ignore[misc]
    item_id: Annotated[Id, Field(description="Raw item id (as in the dataset); numbers are accepted as strings.")]
    features: NotRequired[Annotated[dict[FeatureName, FeatureValue] | None, Field(
        description="Raw item or context feature values overriding the stored ones for this candidate.")]]


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, allow_inf_nan=False, json_schema_extra={
        "examples": [{"user_id": "42", "context": {"device": 0, "hour": 20},
                      "candidates": [{"item_id": "7"}, {"item_id": "11", "features": {"price": 19.9}}]}]})
    request_id: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")] | None = \
        Field(None, description="Echoed back and logged; generated when absent.")
    user_id: Id = Field(description="Raw user id; also the A/B hashing key.")
    context: dict[FeatureName, FeatureValue] | None = Field(
        None, description="Raw request-time features (context side) and user-side overrides (profile values, or "
                          "a whole behaviour sequence as lists, most recent first).")
    candidates: list[Candidate] = Field(min_length=1, description="Items to score (at most the configured "
                                                                   "maximum, default 1000); scores keep this order.")
    model: ModelSpec | None = Field(
        None, description="Bypass the A/B split: `name` (newest served version) or `name:version`.")

    # computed once per request (the validation, the checks and the assembly each read them)
    @functools.cached_property
    def item_ids(self) -> list[str]:
        return [c["item_id"] for c in self.candidates]

    @functools.cached_property
    def candidate_features(self) -> list[dict[str, Any] | None]:
        return [c.get("features") for c in self.candidates]


class ScoreResponse(BaseModel):
    request_id: str
    model: str
    version: int
    arm: str
    scores: list[float] = Field(description="Click probabilities, one per candidate, in request order.")
    flags: dict[str, Any] | None = Field(
        None, description="Present when something is off: `degraded` (store down, cold-start features), "
                          "`user_missing`, `missing_items` (item ids not in the store).")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
    request_id: str | None = None


class _Missing:
    """No body at all."""


MISSING = _Missing()


@functools.lru_cache(maxsize=64)
def is_json_content_type(value: str) -> bool:
    """``application/json`` or ``application/*+json`` (parameters such as charset allowed)."""
    message = email.message.Message()
    message["content-type"] = value
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


def decode_body(raw: bytes, content_type: str | None, fast: bool = True) -> Any:
    """The body as JSON when it is declared JSON (with ``fast``: already a validated
    ``ScoreRequest`` when msgspec accepts it); raw bytes otherwise; ``MISSING`` when empty."""
    if not raw:
        return MISSING
    if not content_type or not is_json_content_type(content_type):
        return raw
    if fast and (request := fast_decode(raw)) is not None:
        return request
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise GatewayError(400, "invalid_json", "request body is not valid JSON") from None
    except Exception:  # not UTF-8/16/32
        raise HTTPException(400, "There was an error parsing the body") from None


def validate_score_request(value: Any, content_type: str | None) -> ScoreRequest:
    """A decoded body -> the request, or 422 naming each problem (never echoing the input)."""
    if type(value) is ScoreRequest:  # validated by fast_decode
        return value
    if type(value) is not dict:
        raise not_an_object(content_type)
    try:
        return ScoreRequest.model_validate(value)
    except ValidationError as exc:
        raise GatewayError(422, "invalid_request", describe_errors(exc.errors(include_url=False))) from None


def not_an_object(content_type: str | None) -> GatewayError:
    """The 422 for a body that is not a JSON object (absent, not JSON by its type, a list...)."""
    return GatewayError(422, "invalid_request", f"the body must be a JSON object (Content-Type: "
                                                f"application/json; got {content_type or 'none'})")


def check_limits(request: ScoreRequest, api: ApiSettings) -> None:
    """The configured size limits (422)."""
    n = len(request.candidates)
    if n > api.max_candidates:
        raise GatewayError(422, "too_many_candidates", f"{n} candidates; at most {api.max_candidates} per request")
    if request.context and len(request.context) > api.max_feature_keys:
        raise GatewayError(422, "too_many_features", f"context has {len(request.context)} keys; at most "
                                                     f"{api.max_feature_keys}")
    for i, f in enumerate(request.candidate_features):
        if f and len(f) > api.max_feature_keys:
            raise GatewayError(422, "too_many_features", f"candidates[{i}].features has {len(f)} keys; "
                                                         f"at most {api.max_feature_keys}")


def read_keys(value: Any, max_candidates: int) -> tuple[str, list[str], str | None] | None:
    """The user id, item ids and model of a decoded body, when its plain shape guarantees that
    validation will give these same values (a string user id, candidates as objects whose
    ``item_id`` is a string or an integer, within the limit): what the early store read is sent
    for. None for anything else, which validation then answers."""
    if type(value) is ScoreRequest:  # validated by fast_decode
        return (value.user_id, value.item_ids, value.model) if len(value.candidates) <= max_candidates else None
    if type(value) is not dict:
        return None
    user, candidates, model = value.get("user_id"), value.get("candidates"), value.get("model")
    if type(user) is not str or type(candidates) is not list or (model is not None and type(model) is not str) \
            or not 0 < len(candidates) <= max_candidates:
        return None
    ids = []
    for c in candidates:
        item = c.get("item_id") if type(c) is dict else None
        if type(item) is str:
            ids.append(item)
        elif type(item) is int:
            ids.append(str(item))
        else:
            return None
    return user, ids, model


def describe_errors(errors: Sequence[Any]) -> str:
    """pydantic's errors as ``field.path: message; ...`` (at most ten, then a count)."""
    msgs = [f"{_loc(tuple(e.get('loc', ())))}: {e.get('msg', 'invalid')}" for e in errors[:10]]
    more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
    return "; ".join(msgs) + more


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for p in (str(p) for p in loc if p != "body"):
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


# -- the msgspec decoder ---------------------------------------------------------------------
# Mirrors ScoreRequest's constraints (tests/service/test_fast_decode.py checks that it accepts
# nothing pydantic rejects and yields the same values). Lengths count code points in both.
_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_Scalar = str | int | float | bool | None  # JSON has no NaN; msgspec rejects 1e400 (out of range)
_Value = _Scalar | Annotated[list[_Scalar], msgspec.Meta(max_length=1000)]
# \Z rather than $: Python's $ also matches before a final newline, pydantic's regex engine does not
_RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+\Z")]
_Model = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}(:[0-9]{1,9})?\Z")]


class _FastCandidate(msgspec.Struct, forbid_unknown_fields=True):
    """A Struct, not a TypedDict: msgspec ignores a TypedDict's unknown keys."""

    item_id: _Id
    features: dict[_Name, _Value] | msgspec.UnsetType | None = msgspec.UNSET


class _FastRequest(msgspec.Struct, forbid_unknown_fields=True):
    user_id: _Id
    candidates: Annotated[list[_FastCandidate], msgspec.Meta(min_length=1)]
    request_id: _RequestId | None = None
    context: dict[_Name, _Value] | None = None
    model: _Model | None = None


_FAST = msgspec.json.Decoder(_FastRequest)
_UNSET = msgspec.UNSET


def fast_decode(raw: bytes) -> ScoreRequest | None:
    """The validated request when msgspec accepts the body; None for the pydantic path to answer."""
    try:
        r = _FAST.decode(raw)
    except (msgspec.DecodeError, ValueError):  # ValueError: a string that is not UTF-8
        return None
    candidates = [{"item_id": c.item_id} if c.features is _UNSET else {"item_id": c.item_id, "features": c.features}
                  for c in r.candidates]
    # validated already: constructed without a second validation (every field counts as set; nothing reads
    # model_fields_set)
    return ScoreRequest.model_construct(request_id=r.request_id, user_id=r.user_id, context=r.context,
                                        candidates=candidates, model=r.model)
