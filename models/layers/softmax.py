"""Softmax over masked scores that stays on ONNX Runtime's fast path.

Masked scores are filled with a large negative number (-1e9) so that they get zero weight. The
exponential of an entry more than ~87 below its row's maximum is a denormal float, and ONNX
Runtime's CPU Softmax (MLAS, on the calling thread when run with one intra-op thread, as served)
then runs far slower per row than on ordinary entries. ``floored_softmax`` raises every entry to at
least ``max - SOFTMAX_FLOOR`` first: an entry below that floor had a weight under e^-60 ≈ 1e-26 of
the largest one and still has at most that, so the result is the same to float32 precision (sums of
weights >= 1 absorb it); an all-masked row stays uniform, as before (callers zero it). The served
MGDIN graph got faster with it: ``ctrserve bench graph --compare <previous export>``, docs/decisions.md
("Floored softmax").
"""

from __future__ import annotations

import torch
from torch import Tensor

#: how far below its row's maximum an entry may lie (below ~87.3 the exponential is a denormal: e^-87.3 = FLT_MIN)
SOFTMAX_FLOOR = 60.0


def floored_softmax(scores: Tensor, dim: int = -1) -> Tensor:
    """``softmax(max(scores, rowmax - SOFTMAX_FLOOR))``: ``torch.softmax`` to float32 precision."""
    floor = scores.amax(dim=dim, keepdim=True) - SOFTMAX_FLOOR
    return torch.softmax(torch.maximum(scores, floor), dim=dim)
