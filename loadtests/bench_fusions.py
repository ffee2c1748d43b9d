"""``ctrserve bench fusions``: fusions of MGDIN's deferred interaction tried against the served graph.

The GFLOP/s target asks for fewer, larger kernels. ``bench graph``'s profile shows where the time
goes: besides the MLP head (near the matmul peak), ~180 ONNX Runtime nodes on [B·m, 32] rows with
m ≤ 6. Two ways to fuse them that need no custom kernel, each measured here on the benchmark
model's own weights, static masks and feature tokens (one request of ``--candidates``), against
the subgraph the served model exports, timed interleaved round by round so that a busy machine
hits both alike, with the outputs compared (a variant that changes the scores is refused):

* **windows fused**: the windows' deferred stacks as one stack over all M = Σ m_h group tokens —
  per-token weights (each window's Q·K fold, V, FFN and LayerNorm affine repeated over its
  tokens) and one block-diagonal mask per layer, so every layer runs once instead of once per
  window (one [B, M, M] attention instead of [B, 6, 6] and [B, 3, 3]);
* **ORT MultiHeadAttention**: a layer's masked attention (scores, mask, floored softmax, weights
  × V) as one ``com.microsoft.MultiHeadAttention`` node with the static mask as an additive bias
  (-80: its exponential stays a normal float, layers/softmax.py) and all-masked rows zeroed after.

Nothing is recorded in docs/; docs/gateway.md cites what this printed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

_MHA_MASK_BIAS = -80.0  # e^-80 ≈ 1.8e-35: negligible beside any kept entry, and not a denormal


def _export(module: Any, example: Any, path: Path, input_name: str) -> Path:
    import torch

    from ctrserve.export.exporter import quiet_exporters

    batch = torch.export.Dim("batch")
    with quiet_exporters():
        torch.onnx.export(module, (example,), str(path), dynamo=True, dynamic_shapes=({0: batch},),
                          input_names=[input_name], output_names=["out"], optimize=True, verbose=False)
    return path


def _served_stacks(model: Any) -> Any:
    """The served model's windows from the feature tokens to their last layer, outputs concatenated
    along the tokens: exactly what ``MGDIN.forward`` runs before pooling (static masks)."""
    import torch
    from torch import nn

    class Served(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.branches = model.branches

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return torch.cat([b(tokens, "static") for b in self.branches], dim=1)

    return Served().eval()


def _fused_stacks(model: Any) -> Any:
    """The same map as ``_served_stacks`` with all windows' layer l computed as one layer."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from ctrserve.models.layers.deferred import masked_attention_weights

    branches = list(model.branches)
    sizes = [b.groups for b in branches]
    m_total, d = sum(sizes), branches[0].layers[0].dim
    if len({len(b.layers) for b in branches}) != 1 or any(layer.heads != 1 or layer.attention != "softmax"
                                                          for b in branches for layer in b.layers):
        raise ValueError("fusing the windows needs one-head softmax layers and the same depth in every window")

    def per_token(tensors: list[torch.Tensor]) -> torch.Tensor:
        """One tensor per window -> that window's tensor repeated over its tokens, windows stacked."""
        return torch.cat([t.unsqueeze(0).expand(m, *t.shape) for t, m in zip(tensors, sizes, strict=True)])

    class FusedLayer(nn.Module):
        def __init__(self, i: int) -> None:
            super().__init__()
            layers = [b.layers[i] for b in branches]
            self.register_buffer("qk", per_token([ly.q.weight.t() @ ly.k.weight * ly.scale for ly in layers]))
            self.register_buffer("v", per_token([ly.v.weight.t() for ly in layers]))
            mask = torch.zeros(m_total, m_total)
            start = 0
            for b, m in zip(branches, sizes, strict=True):
                mask[start:start + m, start:start + m] = 1.0 if b.keeps_all[i] else b.static_masks[i]
                start += m
            self.register_buffer("mask", mask)
            for name in ("norm1", "norm2"):
                self.register_buffer(f"{name}_w", per_token([getattr(ly, name).weight for ly in layers]))
                self.register_buffer(f"{name}_b", per_token([getattr(ly, name).bias for ly in layers]))
            self.register_buffer("up_w", torch.cat([ly.ffn.up.weight for ly in layers]))
            self.register_buffer("up_b", torch.cat([ly.ffn.up.bias for ly in layers]))
            self.register_buffer("down_w", torch.cat([ly.ffn.down.weight for ly in layers]))
            self.register_buffer("down_b", torch.cat([ly.ffn.down.bias for ly in layers]))

        def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
            y = F.layer_norm(x.reshape(-1, d), (d,)).reshape(-1, m_total, d)
            return y * getattr(self, f"{name}_w") + getattr(self, f"{name}_b")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            xt = x.transpose(0, 1)  # token-major: per-token weights as one batched matmul over tokens
            y, v = (xt @ self.qk).transpose(0, 1), (xt @ self.v).transpose(0, 1)
            w = masked_attention_weights(y @ x.transpose(-1, -2), self.mask)
            z_hat = self._norm(w @ v + x, "norm1")
            h = F.gelu(z_hat.transpose(0, 1) @ self.up_w + self.up_b.unsqueeze(1))
            return self._norm((h @ self.down_w).transpose(0, 1) + self.down_b + z_hat, "norm2")

    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.branches = nn.ModuleList(branches)
            self.layers = nn.ModuleList(FusedLayer(i) for i in range(len(branches[0].layers)))

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = torch.cat([b.x0(tokens) for b in self.branches], dim=1)
            for layer in self.layers:
                x = layer(x)
            return x

    return Fused().eval()


def _served_attention(layer: Any, mask: Any) -> Any:
    """One deferred layer's masked attention as the served model computes it (``_attend``)."""
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer
            self.register_buffer("mask", mask)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer._attend(x, self.mask, None)

    return Attention().eval()


def _mha_attention(layer: Any, mask: np.ndarray, path: Path) -> Path:
    """The same attention as one ``com.microsoft.MultiHeadAttention`` node (scale folded into Q)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    qk = (layer.q.weight.t() @ layer.k.weight * layer.scale).detach().numpy().astype(np.float32)
    wv = layer.v.weight.t().detach().numpy().astype(np.float32)
    bias = np.where(mask > 0, 0.0, _MHA_MASK_BIAS).astype(np.float32)[None, None]
    rows = (mask > 0).any(axis=1).astype(np.float32)[:, None]  # all-masked rows give zeros, as served
    m, d = mask.shape[0], layer.dim
    nodes = [helper.make_node("MatMul", ["x", "qk"], ["q"]), helper.make_node("MatMul", ["x", "wv"], ["v"]),
             helper.make_node("MultiHeadAttention", ["q", "x", "v", "", "", "bias"], ["z"], domain="com.microsoft",
                              num_heads=1, scale=1.0),
             helper.make_node("Mul", ["z", "rows"], ["out"])]
    graph = helper.make_graph(
        nodes, "mha", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", m, d])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", m, d])],
        [numpy_helper.from_array(a, n) for a, n in ((qk, "qk"), (wv, "wv"), (bias, "bias"), (rows, "rows"))])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    proto = helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = 9
    onnx.save(proto, str(path))
    return path


def run(candidates: int = 100, rounds: int = 8, per_round: int = 300, run_dir: Path | None = None,
        log: Any = print) -> dict[str, Any]:
    import torch

    from ctrserve.contract.manifest import Manifest
    from ctrserve.export.serving_module import as_tensors, build_serving_module
    from ctrserve.models.train.trainer import load_run

    from .bench_graph import graph_ops, interleaved_latency, optimized_ops
    from .bench_models import build_requests
    from .run_load import bench_dir, ensure_export, ensure_run, prepared_of

    torch.set_num_threads(1)
    run_dir = Path(run_dir) if run_dir else ensure_run("mgdin")
    version_dir = ensure_export(run_dir, bench_dir() / "fusions_repository", "mgdin")
    feed = build_requests(Manifest.load(version_dir), prepared_of(run_dir), [candidates])[candidates]
    _, fmap, model = load_run(run_dir)
    model.eval()
    wrapper = build_serving_module(model, fmap).eval()
    captured: list[torch.Tensor] = []
    hook = model.tokens.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        wrapper(*as_tensors(wrapper, feed))
    hook.remove()
    tokens = captured[0].detach()
    branch = model.branches[0]
    layer, mask = branch.layers[0], branch.static_masks[0]
    with torch.no_grad():
        x0 = branch.x0(tokens)
    log(f"[bench fusions] {len(model.branches)} windows, m = {[b.groups for b in model.branches]}, "
        f"{len(branch.layers)} layers, B = {candidates}")

    out: dict[str, Any] = {"candidates": candidates, "groups": [b.groups for b in model.branches], "pairs": {}}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        tmp_dir = Path(tmp)
        pairs = {
            "windows fused": ({"served": _export(_served_stacks(model), tokens, tmp_dir / "served.onnx", "tokens"),
                               "fused": _export(_fused_stacks(model), tokens, tmp_dir / "fused.onnx", "tokens")},
                              {"tokens": tokens.numpy()}),
            "ORT MultiHeadAttention": (
                {"served": _export(_served_attention(layer, mask), x0, tmp_dir / "attention.onnx", "x"),
                 "fused": _mha_attention(layer, mask.numpy(), tmp_dir / "mha.onnx")},
                {"x": x0.numpy()}),
        }
        for name, (paths, pair_feed) in pairs.items():
            log(f"[bench fusions] {name}: {rounds} interleaved rounds x {per_round} calls")
            lat = interleaved_latency(paths, pair_feed, rounds, per_round)  # refuses different outputs
            out["pairs"][name] = {
                label: {"nodes": sum(graph_ops(p).values()), "ort_nodes": sum(optimized_ops(p).values()),
                        "p50_us": lat[label]["p50_ms"] * 1e3,
                        "round_p50_us": [r * 1e3 for r in lat[label]["round_p50_ms"]]}
                for label, p in paths.items()}
            out["pairs"][name]["fused_over_served"] = lat["fused"]["p50_ms"] / lat["served"]["p50_ms"]
    return out


def fusions_cmd(
    candidates: Annotated[int, typer.Option(help="candidates per request")] = 100,
    rounds: Annotated[int, typer.Option(help="interleaved rounds")] = 8,
    per_round: Annotated[int, typer.Option(help="calls per variant per round")] = 300,
    run_dir: Annotated[Path | None, typer.Option("--run", help="run directory (default: the benchmark run)")] = None,
) -> None:
    """Fusions of MGDIN's deferred layers (windows as one stack; ORT's MultiHeadAttention) timed against
    the served subgraph on the benchmark model's weights and tokens."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if candidates < 1 or rounds < 1 or per_round < 1:
        console.print("[red]error:[/] --candidates, --rounds and --per-round must be >= 1")
        raise typer.Exit(2)
    res = run(candidates, rounds, per_round, run_dir, log=console.print)
    table = Table(title=f"B={candidates}, 1 ORT thread, m = {res['groups']}")
    for col in ("fusion", "graph", "nodes", "ORT nodes", "p50 µs", "round p50s µs", "fused / served"):
        table.add_column(col)
    for name, pair in res["pairs"].items():
        for label in ("served", "fused"):
            g = pair[label]
            table.add_row(name if label == "served" else "", label, str(g["nodes"]), str(g["ort_nodes"]),
                          f"{g['p50_us']:.1f}", " ".join(f"{r:.0f}" for r in g["round_p50_us"]),
                          f"{pair['fused_over_served']:.3f}" if label == "fused" else "")
    console.print(table)
