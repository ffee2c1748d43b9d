"""The ragged signature: the multi-user graph in the layout Triton's onnxruntime backend hands a
dynamically batched execution (``config.pbtxt`` with ``allow_ragged_batch``, deploy flavour).

Each request is one user: user-side inputs ``[1, ...]``, candidate-side inputs ``[1, B, ...]``.
When Triton's dynamic batcher merges R requests, the backend stacks the user-side inputs to
``[R, ...]`` (ordinary batching: their shapes agree) and concatenates every ragged candidate-side
input into ONE 1-D tensor (the onnxruntime backend requires ragged model inputs to be ``[-1]``).
The request boundaries arrive as the batch input ``candidate_offsets`` =
``BATCH_ACCUMULATED_ELEMENT_COUNT`` of a candidate input with one element per candidate: INT32
``[R]``, request r's end (``[3, 7, 12]`` for 3, 4 and 5 candidates). The output ``prob`` is 1-D
``[sum B]``; ``batch_output`` ``BATCH_SCATTER_WITH_INPUT_SHAPE`` of the same input gives request r
the slice of its own candidates, shaped like that input in the request (``[1, B]``).

This graph is the multi-user graph (export/grouped.py) with a prologue: each flat candidate input is
reshaped to ``[B, ...]`` and ``user_index[j] = #{r : offsets[r] <= j}`` (the user row of candidate
j). Written as ``model.triton.onnx`` beside the other graphs and checked by the multi-user parity
gate through an adapter that feeds it exactly that layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ctrserve.contract.manifest import ParityResult, RaggedSignature, TensorSpec

from .parity import Runner, onnx_runner

if TYPE_CHECKING:  # torch stays a lazy import of the export path
    from torch import nn

    from ctrserve.contract.feature_map import FeatureMap

RAGGED_FILE = "model.triton.onnx"
OFFSETS_INPUT = "candidate_offsets"
_ROWS = "__rows"


def offsets_source(inputs: list[TensorSpec]) -> str | None:
    """The candidate input Triton counts elements of: one element per candidate (shape ``[-1]``),
    so its accumulated element counts are candidate offsets and its request shape is the output's."""
    return next((t.name for t in inputs if t.side == "candidate" and t.shape == [-1]), None)


def _rename_uses(graph, rename: dict[str, str]) -> None:
    """Point every use of a renamed tensor (subgraphs too: they may read outer-scope names) at its new name."""
    from onnx import AttributeProto

    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                _rename_uses(attr.g, rename)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _rename_uses(g, rename)
    for out in graph.output:
        if out.name in rename:
            raise ValueError(f"graph output {out.name!r} is an input: cannot add the ragged prologue")


def _prologue(candidates: list[TensorSpec], source: str, index_input: str) -> list:
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value: np.ndarray) -> Any:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))

    nodes = [const("__ragged_axis0", np.array([0], dtype=np.int64)),
             const("__ragged_axis1", np.array([1], dtype=np.int64)),
             const("__ragged_one", np.array(1, dtype=np.int64))]
    for t in candidates:  # flat [B * prod(rest)] -> [B, *rest]
        nodes.append(const(f"{t.name}__shape", np.array([-1, *t.shape[1:]], dtype=np.int64)))
        nodes.append(helper.make_node("Reshape", [t.name, f"{t.name}__shape"], [t.name + _ROWS]))
    nodes += [
        helper.make_node("Cast", [OFFSETS_INPUT], ["__ragged_ends"], to=TensorProto.INT64),
        helper.make_node("Shape", [source + _ROWS], ["__ragged_count"], start=0, end=1),
        helper.make_node("ConstantOfShape", ["__ragged_count"], ["__ragged_ones"],
                         value=numpy_helper.from_array(np.array([1], dtype=np.int64))),
        helper.make_node("CumSum", ["__ragged_ones", "__ragged_axis0"], ["__ragged_upto"]),
        helper.make_node("Sub", ["__ragged_upto", "__ragged_one"], ["__ragged_pos"]),  # 0 .. B-1
        helper.make_node("Unsqueeze", ["__ragged_pos", "__ragged_axis1"], ["__ragged_pos_col"]),
        helper.make_node("Unsqueeze", ["__ragged_ends", "__ragged_axis0"], ["__ragged_ends_row"]),
        helper.make_node("GreaterOrEqual", ["__ragged_pos_col", "__ragged_ends_row"], ["__ragged_after"]),
        helper.make_node("Cast", ["__ragged_after"], ["__ragged_after_i"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["__ragged_after_i", "__ragged_axis1"], [index_input], keepdims=0),
    ]
    return nodes


def build_ragged_graph(grouped_path: Path, out_path: Path, inputs: list[TensorSpec], index_input: str,
                       source: str) -> None:
    """Write the ragged graph: ``grouped_path``'s graph with the prologue above."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(grouped_path))
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 15:  # Shape(start, end) needs 15; Unsqueeze/ReduceSum with axes inputs 13
        raise ValueError(f"the multi-user graph has opset {opset}; the ragged prologue needs >= 15")
    graph = model.graph
    candidates = [t for t in inputs if t.side == "candidate"]
    _rename_uses(graph, {t.name: t.name + _ROWS for t in candidates})
    prologue = _prologue(candidates, source, index_input)
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(prologue + body)
    kept = [i for i in graph.input if i.name != index_input]
    del graph.input[:]
    for i in kept:
        spec = next((t for t in candidates if t.name == i.name), None)
        if spec is None:
            graph.input.append(i)
        else:
            elem = i.type.tensor_type.elem_type
            graph.input.append(helper.make_tensor_value_info(i.name, elem, [f"{i.name}_elements"]))
    graph.input.append(helper.make_tensor_value_info(OFFSETS_INPUT, TensorProto.INT32, ["requests"]))
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))


def as_ragged(request: dict[str, np.ndarray], inputs: list[TensorSpec], index_input: str) -> dict[str, np.ndarray]:
    """A multi-user request in the ragged layout Triton feeds: flat candidate inputs and the
    accumulated candidate counts per user (``user_index`` must list users in order, as batches do)."""
    index = request[index_input]
    users = len(request[next(t.name for t in inputs if t.side == "user")])
    if np.any(np.diff(index) < 0):
        raise ValueError("user_index must be non-decreasing: Triton concatenates requests in order")
    out = {t.name: np.ascontiguousarray(request[t.name].reshape(-1) if t.side == "candidate" else request[t.name])
           for t in inputs}
    out[OFFSETS_INPUT] = np.cumsum(np.bincount(index, minlength=users)).astype(np.int32)
    return out


def ragged_runner(path: Path, inputs: list[TensorSpec], index_input: str) -> Runner:
    """Runs the ragged graph on multi-user requests (the parity gate's runner)."""
    run = onnx_runner(path)
    return lambda request: run(as_ragged(request, inputs, index_input))


def export_ragged(model: nn.Module, fmap: FeatureMap, out_dir: Path, grouped_file: str, inputs: list[TensorSpec],
                  index_input: str, rows: dict[str, np.ndarray], tolerance: float,
                  runtime: str) -> tuple[RaggedSignature | None, str]:
    """Build and gate the ragged graph; ``(None, reason)`` when Triton's onnxruntime backend cannot
    batch this model (its config then keeps one request per execution)."""
    from .grouped import build_gated, check_grouped_parity

    source = offsets_source(inputs)
    if source is None:
        return None, "no candidate input has one element per candidate (shape [-1]) to count candidates by"
    path = out_dir / RAGGED_FILE

    def build() -> ParityResult:
        build_ragged_graph(out_dir / grouped_file, path, inputs, index_input, source)
        return check_grouped_parity(model, fmap, ragged_runner(path, inputs, index_input), runtime, rows, tolerance)

    parity, reason = build_gated(path, build, "ragged export", "ragged graph")
    if parity is None:
        return None, reason
    return RaggedSignature(file=RAGGED_FILE, offsets_input=OFFSETS_INPUT, offsets_source=source, parity=parity), ""
