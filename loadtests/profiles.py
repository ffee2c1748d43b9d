"""Reading py-spy's collapsed stacks (``--format raw``): where a process spends its samples."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

#: gateway stages recognised in stack frames: label -> substrings any of which marks the frame
GATEWAY_MARKERS: dict[str, tuple[str, ...]] = {
    "ONNX Runtime run (Session.run, inline or on the inference thread)": ("Session.run (onnxruntime/",),
    "event loop thread (uvloop, all request handling)": ("Runner.run (asyncio/runners.py",),
    "request handling in Python (GatewayMiddleware and below)": ("GatewayMiddleware.__call__",),
    "Gateway.score (routing, fetch, assembly, awaiting inference)": ("Gateway.score (",),
    "feature fetch (Redis client + decode)": ("online_read (", "online_read_blocking (", "redis/asyncio/"),
    "assembly": ("Assembler.",),
    "body parsing + validation (FastAPI, pydantic)": ("solve_dependencies", "request_body_to_args", "Request.json",
                                                      "Request.body", "_decode (service/api.py",
                                                      "_validate (service/api.py"),
    "response JSON": ("OrjsonResponse.render", "serialize_response"),
    "HTTP protocol (uvicorn, httptools)": ("uvicorn/protocols",),
    "Prometheus metrics": ("prometheus_client",),
    "thread-pool hand-off (futures, Condition wait/notify)": ("Condition.wait", "Condition.notify",
                                                              "run_in_executor"),
}


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    """``[(frames root-first, samples)]`` from a collapsed-stack file."""
    return read_collapsed_text(Path(path).read_text(errors="replace"))


def read_collapsed_text(text: str) -> list[tuple[list[str], int]]:
    out = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            out.append((stack.split(";"), int(count)))
    return out


def inclusive_shares(stacks: list[tuple[list[str], int]], markers: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """Share of all samples whose stack contains a frame matching each label (a sample counts
    once per label; labels may overlap, e.g. pydantic inside assembly)."""
    total = sum(n for _, n in stacks) or 1
    hits: Counter[str] = Counter()
    for frames, n in stacks:
        for label, subs in markers.items():
            if any(s in f for f in frames for s in subs):
                hits[label] += n
    return {label: hits[label] / total for label in markers}


def top_self(stacks: list[tuple[list[str], int]], n: int = 10) -> list[tuple[str, float]]:
    """The ``n`` leaf frames with the most samples, as shares of all samples."""
    total = sum(c for _, c in stacks) or 1
    leaves: Counter[str] = Counter()
    for frames, c in stacks:
        leaves[frames[-1]] += c
    return [(frame, c / total) for frame, c in leaves.most_common(n)]
