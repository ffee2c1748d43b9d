"""How well raw inference uses the cores: FLOPs of one request from the ONNX graph, a plain fp32
matrix-multiply peak on the same thread count, and ONNX Runtime's per-operator time.

FLOPs: every MatMul, Gemm, Conv and two-operand Einsum node, with the shapes its inputs have for
the given request (read by running the graph once, optimisations off, with those tensors exposed
as outputs). One multiply-add = 2 FLOPs; bias adds, activations, softmax, normalisation and
gathers are not counted (memory-bound, small next to the products): a lower bound. MatMul
``[..., M, K] x [..., K, N]`` (broadcast, 1-D promoted): ``2·batch·M·N·K``; Gemm: ``2·M·N·K``;
Conv: ``2·N·C_out·prod(out spatial)·C_in/group·prod(kernel)``; Einsum: ``2·prod(index sizes)``
when an index is summed, else ``prod`` (one multiply per output).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .harness import ort_options, ort_session

COUNTED = ("MatMul", "Gemm", "Conv", "Einsum")


@dataclass
class FlopCount:
    total: int
    by_op: dict[str, int]
    nodes: int
    #: counted-kind nodes whose shapes could not be read (inside subgraphs, unknown types)
    skipped: list[str] = field(default_factory=list)


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def matmul_flops(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    a2 = (1, *a) if len(a) == 1 else a
    b2 = (*b, 1) if len(b) == 1 else b
    (m, k), (k2, n) = a2[-2:], b2[-2:]
    if k != k2:
        raise ValueError(f"MatMul shapes {a} x {b} do not agree")
    return 2 * math.prod(np.broadcast_shapes(tuple(a2[:-2]), tuple(b2[:-2]))) * m * n * k


def gemm_flops(a: tuple[int, ...], b: tuple[int, ...], trans_a: int, trans_b: int) -> int:
    m, k = (a[1], a[0]) if trans_a else (a[0], a[1])
    return 2 * m * (b[0] if trans_b else b[1]) * k


def conv_flops(w: tuple[int, ...], out: tuple[int, ...], group: int) -> int:
    c_out, c_in_g, *kernel = w
    return 2 * out[0] * c_out * math.prod(out[2:]) * c_in_g * math.prod(kernel)


def einsum_flops(equation: str, shapes: list[tuple[int, ...]]) -> int:
    if len(shapes) != 2:
        return 0  # one operand: a transpose or a reduction, not a product
    eq = equation.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if any("..." in t for t in terms):
        raise ValueError(f"Einsum {equation!r}: ellipsis not supported")
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes, strict=True):
        for letter, dim in zip(term, shape, strict=True):
            sizes[letter] = max(sizes.get(letter, 1), dim)
    if not rhs and "->" not in eq:  # implicit output: letters seen once, sorted
        rhs = "".join(sorted(c for c in sizes if lhs.count(c) == 1))
    return math.prod(sizes.values()) * (2 if set(sizes) - set(rhs) else 1)


def _shapes(model: Any, nodes: list[Any], inputs: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Shapes of the counted nodes' inputs and outputs: weights from the file, the rest from one run."""
    import onnx
    from onnx import helper, numpy_helper, shape_inference

    graph = model.graph
    known = {t.name: tuple(t.dims) for t in graph.initializer}
    for node in graph.node:  # Constant nodes hold weights too in dynamo exports
        for a in node.attribute if node.op_type == "Constant" else []:
            if a.name == "value":
                known[node.output[0]] = tuple(numpy_helper.to_array(a.t).shape)
    known.update({k: tuple(v.shape) for k, v in inputs.items()})
    wanted = {i for n in nodes for i in [*n.input, *n.output] if i}
    inferred = shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.output, *inferred.input]}
    for name in sorted(wanted - set(known) - {i.name for i in graph.input} - {o.name for o in graph.output}):
        if types.get(name):
            graph.output.append(helper.make_tensor_value_info(name, types[name], None))
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, str(Path(tmp) / "exposed.onnx"))
        sess = ort_session(Path(tmp) / "exposed.onnx", optimize=False)
        names = [o.name for o in sess.get_outputs()]
        values = sess.run(names, {i.name: inputs[i.name] for i in sess.get_inputs()})
    return {**known, **{n: tuple(np.shape(v)) for n, v in zip(names, values, strict=True)}}


def count_flops(model_path: Path, inputs: dict[str, np.ndarray]) -> FlopCount:
    """FLOPs of one run of the graph on ``inputs`` (see the module docstring for the method)."""
    import onnx

    model = onnx.load(str(model_path))
    skipped = [f"{n.op_type} in subgraph of {node.name}" for node in model.graph.node for a in node.attribute
               if a.g.node or a.graphs for g in [a.g, *a.graphs] for n in g.node if n.op_type in COUNTED]
    nodes = [n for n in model.graph.node if n.op_type in COUNTED]
    shapes = _shapes(model, nodes, inputs)
    by_op: dict[str, int] = defaultdict(int)
    for node in nodes:
        ins, out = [shapes.get(i) for i in node.input if i], shapes.get(node.output[0])
        if any(s is None for s in ins) or (node.op_type == "Conv" and out is None):
            skipped.append(f"{node.op_type} {node.name}: shape unknown")
            continue
        if node.op_type == "MatMul":
            f = matmul_flops(ins[0], ins[1])
        elif node.op_type == "Gemm":
            f = gemm_flops(ins[0], ins[1], _attr(node, "transA", 0), _attr(node, "transB", 0))
        elif node.op_type == "Conv":
            f = conv_flops(ins[1], out, _attr(node, "group", 1))
        else:
            eq = _attr(node, "equation", b"")
            f = einsum_flops(eq.decode() if isinstance(eq, bytes) else eq, ins)
        by_op[node.op_type] += int(f)
    return FlopCount(sum(by_op.values()), dict(by_op), len(nodes), skipped)


# -- peak ------------------------------------------------------------------------------------
def _matmul_model(n: int) -> bytes:
    from onnx import TensorProto, helper

    a, b, c = (helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "abc")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "sgemm", [a, b], [c])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _best_median(fn: Any, reps: int, rounds: int = 3) -> float:
    """Median of ``reps`` timed calls, best of ``rounds`` rounds: a peak, robust to a busy neighbour."""
    fn()
    best = math.inf
    for _ in range(rounds):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        best = min(best, float(np.median(ts)))
    return best


def sgemm_peak(threads: int = 1, sizes: tuple[int, ...] = (256, 512, 1024), reps: int = 5) -> float:
    """Plain fp32 ``n x n`` matrix multiply: the best GFLOP/s over ``sizes`` of ONNX Runtime's MatMul
    (``threads`` intra-op threads) and numpy's BLAS (limited to ``threads`` via threadpoolctl)."""
    from threadpoolctl import threadpool_limits  # comes with scikit-learn

    rng = np.random.default_rng(0)
    best = 0.0
    for n in sizes:
        a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
        sess = ort_session(_matmul_model(n), threads, spinning=False)
        seconds = _best_median(lambda s=sess, a=a, b=b: s.run(None, {"a": a, "b": b}), reps)
        with threadpool_limits(limits=threads):
            seconds = min(seconds, _best_median(lambda a=a, b=b: a @ b, reps))
        best = max(best, 2 * n**3 / seconds / 1e9)
    return best


def efficiency(sess: Any, feed: dict[str, np.ndarray], flop_count: int, rounds: int = 5, reps: int = 100,
               threads: int = 1) -> dict[str, Any]:
    """The model's GFLOP/s over the fp32 matmul peak, both timed the same way and interleaved:
    each round measures the peak (``sgemm_peak``) and then ``reps`` runs of ``sess`` on ``feed``.
    The peak is the best round's (a peak); the model's time is the median of all its runs."""
    times: list[float] = []
    peaks: list[float] = []
    sess.run(None, feed)
    for _ in range(rounds):
        peaks.append(sgemm_peak(threads=threads))
        for _ in range(reps):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t0)
    p50 = float(np.median(times))
    gflops = flop_count / p50 / 1e9
    return {"model_p50_ms": p50 * 1e3, "gflops": gflops, "peak_gflops": max(peaks), "round_peaks": peaks,
            "ratio": gflops / max(peaks), "rounds": rounds, "reps": reps}


# -- where ONNX Runtime spends its time ------------------------------------------------------
def ort_profile_events(model_path: Path, inputs: dict[str, np.ndarray], runs: int = 20,
                       threads: int = 1) -> list[dict[str, Any]]:
    """ORT's profiler events for ``runs`` runs of one request (graph optimisations on, as served)."""
    import onnxruntime as ort

    opts = ort_options(threads, spinning=False)
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        feed = {i.name: inputs[i.name] for i in sess.get_inputs()}
        for _ in range(runs):
            sess.run(None, feed)
        return json.loads(Path(sess.end_profiling()).read_text())


def _kernels(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")]


def aggregate_profile(events: list[dict[str, Any]], runs: int) -> list[tuple[str, float, float]]:
    """``[(op type, ms per run, share of kernel time)]``, largest first."""
    per_op: dict[str, float] = defaultdict(float)
    for e in _kernels(events):
        per_op[e.get("args", {}).get("op_name", "?")] += float(e.get("dur", 0.0))
    total = sum(per_op.values()) or 1.0
    return sorted(((op, us / runs / 1e3, us / total) for op, us in per_op.items()), key=lambda r: -r[1])


def shape_share(events: list[dict[str, Any]], runs: int, dims: tuple[int, ...]) -> tuple[float, float]:
    """``(ms per run, share of kernel time)`` of the nodes with an output tensor whose shape holds
    all of ``dims`` — with ``(B, L)``: work done per candidate *and* per sequence event, i.e. the
    user's sequence broadcast to the candidates inside the graph."""
    total = hit = 0.0
    for e in _kernels(events):
        dur = float(e.get("dur", 0.0))
        total += dur
        shapes = [next(iter(d.values())) for d in e.get("args", {}).get("output_type_shape", []) if d]
        if any(all(shape.count(x) >= dims.count(x) for x in set(dims)) for shape in shapes):
            hit += dur
    return hit / runs / 1e3, hit / total if total else 0.0
