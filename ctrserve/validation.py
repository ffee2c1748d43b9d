"""One-line messages for pydantic validation errors, shared by every config loader (torch-free)."""

from __future__ import annotations

from pydantic import ValidationError


def describe(exc: ValidationError) -> str:
    """``field.path: message; ...`` for each problem (no location prefix for whole-object checks)."""
    return "; ".join(
        (".".join(str(p) for p in e["loc"]) + ": " if e["loc"] else "") + e["msg"]
        for e in exc.errors(include_url=False)
    )
