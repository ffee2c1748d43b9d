"""``docs/benchmarks.json`` -> ``docs/benchmarks.md``: a generic renderer shared by every benchmark.

The JSON holds flat figures (``"store_fetch_p50_ms": 0.41``) that anyone can read, plus a
``sections`` map describing each benchmark run: title, command, date, machine facts and, for
each figure, what it means. A benchmark calls :func:`record_section` (a locked
read-merge-write) and then :func:`write_markdown`, which replaces only its own section of the
Markdown (between ``<!-- bench:NAME -->`` markers) so hand-written text around it survives.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ctrserve.paths import REPO_ROOT

BENCH_JSON = REPO_ROOT / "docs" / "benchmarks.json"
BENCH_MD = REPO_ROOT / "docs" / "benchmarks.md"
MD_HEADER = ("# Benchmarks\n\nGenerated from `docs/benchmarks.json` by `loadtests/report.py`; each section is "
             "rewritten by the command named in it. Do not edit inside the markers.\n")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise read-modify-write of ``path`` across processes: an exclusive flock on the file itself
    (created empty if absent; closing it releases the lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def load(path: Path | None = None) -> dict[str, Any]:
    path = path or BENCH_JSON
    text = path.read_text() if path.exists() else ""
    return json.loads(text) if text.strip() else {}  # empty: just created by _locked


def record_section(name: str, title: str, command: str, figures: dict[str, tuple[float, str]],
                   notes: list[str] | None = None, machine: dict[str, Any] | None = None,
                   path: Path | None = None) -> dict[str, Any]:
    """Merge one benchmark's figures (``key -> (value, meaning)``) into the JSON; other keys stay."""
    path = path or BENCH_JSON
    with _locked(path):
        data = load(path)
        old = data.get("sections", {}).get(name, {})
        for key in old.get("figures", {}):  # figures this benchmark no longer reports
            data.pop(key, None)
        data.update({k: v for k, (v, _) in figures.items()})
        data.setdefault("sections", {})[name] = {
            "title": title, "command": command,
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine or {},
            "figures": {k: meaning for k, (_, meaning) in figures.items()},
            "notes": notes or [],
        }
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        return data


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_section(data: dict[str, Any], name: str) -> str:
    sec = data["sections"][name]
    machine = ", ".join(f"{k} {v}" for k, v in sec["machine"].items())
    lines = [f"## {sec['title']}", "", f"`{sec['command']}` — measured {sec['measured_at']} on: {machine}.", "",
             "| figure | value | meaning |", "|---|---:|---|"]
    lines += [f"| `{key}` | {_fmt(data.get(key))} | {meaning} |" for key, meaning in sec["figures"].items()]
    if sec.get("notes"):
        lines += ["", *(f"- {n}" for n in sec["notes"])]
    return "\n".join(lines) + "\n"


def write_markdown(name: str, data: dict[str, Any] | None = None, json_path: Path | None = None,
                   md_path: Path | None = None) -> None:
    """Replace section ``name`` of the Markdown (appending it if new) with its rendering."""
    data = data if data is not None else load(json_path)
    md_path = md_path or BENCH_MD
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{render_section(data, name)}{end}"
    with _locked(md_path):
        text = md_path.read_text() or MD_HEADER  # _locked created it if absent
        if start in text and end in text:
            head, rest = text.split(start, 1)
            text = head + block + rest.split(end, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        md_path.write_text(text)
