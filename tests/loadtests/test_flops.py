"""FLOP counting on a tiny ONNX graph with a known count, the formulas, and profile aggregation."""

from __future__ import annotations

import numpy as np
import pytest

from ctrserve.loadtests import flops

pytestmark = pytest.mark.quick


def _tiny_graph(path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((3, 5)).astype(np.float32), "w2")
    wc = numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "wc")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),                        # [B,4]x[4,5]: 2*B*4*5
        helper.make_node("Relu", ["h"], ["r"]),                                # not counted
        helper.make_node("Gemm", ["r", "w2"], ["g"], transB=1),                # [B,5]x[5,3]: 2*B*5*3
        helper.make_node("Einsum", ["seq", "r"], ["s"], equation="bld,bd->bl"),  # 2*B*6*5
        helper.make_node("Conv", ["img", "wc"], ["c"]),                        # 2*1*4*(3*3)*2*(3*3)
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4]),
              helper.make_tensor_value_info("seq", TensorProto.FLOAT, ["B", 6, 5]),
              helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 2, 5, 5])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
               for n, shape in (("g", ["B", 3]), ("s", ["B", 6]), ("c", [1, 4, 3, 3]))]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, [w1, w2, wc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_count_flops_on_a_known_graph(tmp_path) -> None:
    _tiny_graph(tmp_path / "tiny.onnx")
    b = 3
    feed = {"x": np.ones((b, 4), np.float32), "seq": np.ones((b, 6, 5), np.float32),
            "img": np.ones((1, 2, 5, 5), np.float32)}
    count = flops.count_flops(tmp_path / "tiny.onnx", feed)
    expected = {"MatMul": 2 * b * 4 * 5, "Gemm": 2 * b * 5 * 3, "Einsum": 2 * b * 6 * 5, "Conv": 2 * 4 * 9 * 2 * 9}
    assert count.by_op == expected
    assert count.total == sum(expected.values()) == 1686
    assert count.nodes == 4 and count.skipped == []


@pytest.mark.parametrize(("a", "b", "expected"), [
    ((3, 4), (4, 5), 2 * 3 * 4 * 5),
    ((2, 3, 4), (4, 5), 2 * 2 * 3 * 4 * 5),        # broadcast batch
    ((2, 1, 3, 4), (7, 4, 5), 2 * 14 * 3 * 4 * 5),  # both sides broadcast
    ((4,), (4, 5), 2 * 4 * 5),                       # 1-D promoted
    ((3, 4), (4,), 2 * 3 * 4),
])
def test_matmul_flops(a: tuple, b: tuple, expected: int) -> None:
    assert flops.matmul_flops(a, b) == expected


def test_matmul_flops_rejects_mismatch() -> None:
    with pytest.raises(ValueError, match="do not agree"):
        flops.matmul_flops((3, 4), (5, 6))


def test_einsum_and_gemm_flops() -> None:
    assert flops.einsum_flops("ij,jk", [(2, 3), (3, 4)]) == 2 * 2 * 3 * 4  # implicit output ik: j summed
    assert flops.einsum_flops("ij,ij->ij", [(2, 3), (2, 3)]) == 6        # elementwise: 1 multiply each
    assert flops.einsum_flops("ij->ji", [(2, 3)]) == 0
    assert flops.gemm_flops((4, 3), (5, 4), trans_a=1, trans_b=1) == 2 * 3 * 5 * 4


def _event(op: str, dur: float, shape: list[int]) -> dict:
    return {"cat": "Node", "name": f"n_{op}_kernel_time", "dur": dur,
            "args": {"op_name": op, "output_type_shape": [{"float": shape}]}}


def test_profile_aggregation_and_shape_share() -> None:
    events = [_event("Mul", 300.0, [100, 600, 16]), _event("Gemm", 100.0, [100, 400]),
              _event("Concat", 600.0, [100, 600, 32]), {"cat": "Session", "name": "run", "dur": 5000.0}]
    rows = flops.aggregate_profile(events, runs=2)
    assert rows[0] == ("Concat", pytest.approx(0.3), pytest.approx(0.6))
    assert [r[0] for r in rows] == ["Concat", "Mul", "Gemm"]
    ms, share = flops.shape_share(events, 2, (100, 600))
    assert ms == pytest.approx(0.45) and share == pytest.approx(0.9)
    assert flops.shape_share(events, 2, (100, 100)) == (0.0, 0.0)  # needs 100 twice


def test_efficiency_times_the_model_like_the_peak(monkeypatch) -> None:
    """The ratio is the model's GFLOP/s (FLOPs / median run time) over the best round's peak."""
    import onnxruntime as ort

    peaks = iter([50.0, 80.0, 60.0])
    monkeypatch.setattr(flops, "sgemm_peak", lambda threads=1: next(peaks))
    sess = ort.InferenceSession(flops._matmul_model(64), providers=["CPUExecutionProvider"])
    feed = {"a": np.ones((64, 64), np.float32), "b": np.ones((64, 64), np.float32)}
    out = flops.efficiency(sess, feed, 2 * 64**3, rounds=3, reps=5)
    assert out["peak_gflops"] == 80.0 and out["round_peaks"] == [50.0, 80.0, 60.0]
    assert out["gflops"] == pytest.approx(2 * 64**3 / (out["model_p50_ms"] / 1e3) / 1e9)
    assert out["ratio"] == pytest.approx(out["gflops"] / 80.0)
