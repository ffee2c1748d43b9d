"""Softmax over masked scores that stays on ONNX Runtime's fast path.

Masked scores are filled with a large negative number (-1e9) so that they get zero weight. ONNX
Runtime's CPU Softmax (MLAS, one intra-op thread as served) is ~10x slower per row when entries
lie far below the row maximum: [100, 600] scores took 237 µs with half the entries at -1e9 or -inf
against 20 µs with all entries within 80 of the maximum (`ctrserve bench graph` shows the per-op
profile). ``floored_softmax`` raises every entry to at least ``max - SOFTMAX_FLOOR`` first: an entry
below that floor had a weight under e^-60 ≈ 1e-26 of the largest one and still has at most that, so
the result is the same to float32 precision (sums of weights >= 1 absorb it); an all-masked row
stays uniform, as before (callers zero it).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: how far below its row's maximum an entry may lie (ORT's fast path holds up to ~87, ln(FLT_MAX))
SOFTMAX_FLOOR = 60.0


def floored_softmax(scores: Tensor, dim: int = -1) -> Tensor:
    """``softmax(max(scores, rowmax - SOFTMAX_FLOOR))``: ``torch.softmax`` to float32 precision."""
    floor = scores.amax(dim=dim, keepdim=True) - SOFTMAX_FLOOR
    return torch.softmax(torch.maximum(scores, floor), dim=dim)
