"""Admin endpoints (``Authorization: Bearer <CTRSERVE_API_ADMIN_TOKEN>``; disabled without a token):
read, replace and reload the routing config, and ask which arm users get."""

from __future__ import annotations

import hmac

import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from .api import ERRORS, gateway
from .errors import GatewayError, OrjsonResponse
from .gateway import Gateway, config_digest
from .request import Id
from .routing import NotFound, RoutingError, parse_config, parse_yaml


async def require_admin(request: Request, gw: Gateway = Depends(gateway)) -> None:
    token = gw.settings.api.admin_token
    if token is None:
        raise GatewayError(403, "admin_disabled", "admin endpoints are disabled: set CTRSERVE_API_ADMIN_TOKEN")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise GatewayError(401, "unauthorized", "admin endpoints need 'Authorization: Bearer <admin token>'")


router = APIRouter(tags=["admin"], dependencies=[Depends(require_admin)], responses=ERRORS)


@router.get("/admin/routing")
async def get_routing(gw: Gateway = Depends(gateway)) -> Response:
    """The routing config in effect."""
    cfg = gw.require_table("no routing config in effect").router.config
    return OrjsonResponse({"digest": config_digest(cfg), "config": cfg.model_dump(mode="json")})


@router.put("/admin/routing", openapi_extra={"requestBody": {"required": True, "content": {
    "application/yaml": {"schema": {"type": "string"}}, "application/json": {"schema": {"type": "object"}}}}})
async def put_routing(request: Request, gw: Gateway = Depends(gateway)) -> Response:
    """Validate a new routing config (YAML or JSON body), load its models, then swap it in
    atomically. A bad config answers 422 and the previous one stays in effect."""
    raw = await request.body()
    try:
        if "json" in request.headers.get("content-type", ""):
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise RoutingError(f"body is not valid JSON: {exc}") from None
            config = parse_config(doc, "request body")
        else:
            config = parse_yaml(raw, "request body")
    except RoutingError as exc:
        gw.metrics.reloads.labels("admin", "rejected").inc()
        raise GatewayError(422, "routing_rejected", str(exc)) from None
    try:
        digest = await gw.apply(config, "admin")  # counts its own rejections
    except RoutingError as exc:
        raise GatewayError(422, "routing_rejected", str(exc)) from None
    return OrjsonResponse({"status": "applied", "digest": digest})


@router.post("/admin/routing/reload")
async def reload_routing(gw: Gateway = Depends(gateway)) -> Response:
    """Re-read the routing file (CTRSERVE_ROUTING_CONFIG) and apply it like PUT does."""
    try:
        digest = await gw.reload_file("admin")
    except RoutingError as exc:
        raise GatewayError(422, "routing_rejected", str(exc)) from None
    return OrjsonResponse({"status": "applied", "digest": digest})


class AssignRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    user_ids: list[Id] = Field(min_length=1, max_length=100_000)
    experiment: str | None = Field(None, description="Experiment to assign in (default: the config's default).")


@router.post("/admin/routing/assign")
async def assign(body: AssignRequest, gw: Gateway = Depends(gateway)) -> Response:
    """Which arm (and bucket) each user gets under the config in effect — the same function
    ``/v1/score`` routes with; for QA and for checking a split without scoring."""
    table = gw.require_table("no routing config in effect")
    try:
        routes = [table.router.assign(u, body.experiment) for u in body.user_ids]
    except NotFound as exc:
        raise GatewayError(404, "not_found", str(exc)) from None
    return OrjsonResponse({"experiment": routes[0].experiment, "arms": [r.arm for r in routes],
                           "buckets": [r.bucket for r in routes]})
