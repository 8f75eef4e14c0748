"""Does 2:4 sparsity make a matmul faster? Dense vs semi-structured sparse timing, and the quant
bench's pruning-row fields.

- ``semi_structured_speedup``: ``y = x @ W.T`` with ``W`` dense and ``W`` 2:4-sparse through
  PyTorch's ``to_sparse_semi_structured`` (cuSPARSELt on Hopper; the CUTLASS kernels are built
  for sm80 only), at given layer shapes and token counts, timed with ``labkit.profiling.time_fn``
  from Python and replayed from a CUDA graph. On a CPU, or a GPU before Ampere, every row is
  skipped with the reason.
- ``pruning_fields``: what ``labkit bench quant`` adds to a pruning row (``labkit.prune``'s
  named methods): ``sparsity``, what a sparse format would store, and on a GPU
  ``matmul_speedup`` of the model's MLP matmuls at ``MATMUL_TOKENS`` tokens.

Used by the model-optimization lab (lab 04) and ``results/prune_speed.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from labkit import prune

MATMUL_TOKENS = 256  # tokens (rows of x) of the bench rows' matmul timing: a prefill chunk
DTYPES = ("bfloat16", "float16", "int8")
UNSTRUCTURED = ("unstructured sparsity has no fast kernel here: the pruned weights stay dense, "
                "so every matmul is the dense one")


def semi_structured_skip_reason(device=None) -> str | None:
    """Why 2:4 sparse kernels cannot run here, or None when they can (CUDA, compute >= 8.0)."""
    if not torch.cuda.is_available():
        return "2:4 sparse kernels need an NVIDIA GPU (Ampere or newer); this run has no CUDA"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return (f"2:4 sparse kernels need compute capability >= 8.0 (Ampere); this GPU has "
                f"{major}.{minor}")
    return None


def _graphed(fn):
    """``fn`` captured once in a CUDA graph; the returned callable replays it (no host work per
    call beyond the launch of the graph)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up outside the graph (library handles, workspace)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _random(shape: tuple[int, int], dtype: str, gen: torch.Generator) -> torch.Tensor:
    if dtype == "int8":
        return torch.randint(-127, 128, shape, device="cuda", dtype=torch.int8, generator=gen)
    return torch.randn(shape, device="cuda", dtype=getattr(torch, dtype), generator=gen)


def semi_structured_speedup(shapes: Sequence[tuple[int, int]], tokens: Sequence[int] = (1, 16, 256),
                            dtype: str = "bfloat16", warmup: int = 5, repeats: int = 50,
                            seed: int = 0) -> list[dict]:
    """Time ``y = x @ W.T`` with ``W`` dense and ``W`` 2:4-sparse, for each weight shape
    ``(out_features, in_features)`` and each number of tokens (rows of ``x``).

    Each matmul is timed twice (median of ``repeats`` synchronized calls after ``warmup``, in
    ms): called from Python (``*_eager_ms``) and replayed from a CUDA graph (``dense_ms``,
    ``sparse_ms``), which removes the host-side cost of each call (PyTorch's sparse tensor
    subclass and cuSPARSELt's per-call set-up take a large, fixed part of a small matmul).
    ``matmul_speedup`` = dense_ms / sparse_ms (both graphed: the kernels' own speed);
    ``eager_speedup`` the same from Python. ``dtype="int8"``: the sparse side is int8 (x and W,
    int8 output, no scales: kernel speed only) against the bf16 dense matmul it would replace;
    float dtypes also give ``max_abs_error``, the sparse result against the dense matmul of the
    same pruned weight. Rows that cannot run have ``skipped`` (the reason) instead.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    reason = semi_structured_skip_reason()
    if reason is not None:
        return [{"shape": list(s), "tokens": t, "skipped": reason} for s in shapes for t in tokens]
    from torch.sparse import to_sparse_semi_structured

    from labkit.profiling import time_fn

    dense_dtype = "bfloat16" if dtype == "int8" else dtype
    gen = torch.Generator(device="cuda").manual_seed(seed)
    linear = torch.nn.functional.linear
    rows = []
    for out_f, in_f in shapes:
        w = _random((out_f, in_f), dtype, gen)
        w = w * prune.mask_2_4(w).to(w.dtype)
        for t in tokens:
            x = _random((t, in_f), dtype, gen)
            row = {"shape": [out_f, in_f], "tokens": t, "dtype": dtype,
                   "dense_dtype": dense_dtype}
            try:
                w_sparse = to_sparse_semi_structured(w)
                dt = getattr(torch, dense_dtype)
                ms = {}
                for name, xx, weight in (("dense", x.to(dt), w.to(dt)), ("sparse", x, w_sparse)):
                    def fn(xx=xx, weight=weight):
                        return linear(xx, weight)

                    ms[f"{name}_eager_ms"] = time_fn(fn, warmup, repeats, "cuda").median_s * 1e3
                    ms[f"{name}_ms"] = time_fn(_graphed(fn), warmup, repeats,
                                               "cuda").median_s * 1e3
                if dtype != "int8":
                    ms["max_abs_error"] = (linear(x, w_sparse).float()
                                           - linear(x, w).float()).abs().max().item()
            except (RuntimeError, ValueError) as exc:
                rows.append({**row, "skipped": f"{type(exc).__name__}: {exc}"})
                continue
            rows.append({**row, **ms, "matmul_speedup": ms["dense_ms"] / ms["sparse_ms"],
                         "eager_speedup": ms["dense_eager_ms"] / ms["sparse_eager_ms"]})
    return rows


def mlp_shapes(config) -> list[tuple[int, int]]:
    """``(out_features, in_features)`` of a Llama-style MLP's gate, up and down projections."""
    h, i = config.hidden_size, config.intermediate_size
    return [(i, h), (i, h), (h, i)]


def mlp_speedup(config, dtype: str = "bfloat16", tokens: int = MATMUL_TOKENS) -> dict:
    """Dense vs 2:4 time of the model's MLP block (gate, up and down matmuls summed, graphed) at
    ``tokens`` tokens: ``{"matmul_speedup", "matmul_dense_ms", "matmul_sparse_ms", ...}``, or
    ``{"matmul_speedup_skipped": reason}``."""
    shapes = mlp_shapes(config)
    distinct = list(dict.fromkeys(shapes))
    rows = {tuple(r["shape"]): r for r in semi_structured_speedup(distinct, (tokens,), dtype)}
    skipped = [r["skipped"] for r in rows.values() if "skipped" in r]
    if skipped:
        return {"matmul_speedup_skipped": skipped[0]}
    dense = sum(rows[s]["dense_ms"] for s in shapes)
    sparse = sum(rows[s]["sparse_ms"] for s in shapes)
    return {"matmul_speedup": dense / sparse, "matmul_dense_ms": dense, "matmul_sparse_ms": sparse,
            "matmul_tokens": tokens, "matmul_shapes": [list(s) for s in shapes],
            "matmul_dtype": dtype}


def pruning_fields(model, name: str) -> dict:
    """The pruning-row fields of ``labkit bench quant`` for ``model`` pruned by method ``name``.

    ``sparsity``: zeros over the target linear weights. ``sparse_format`` and
    ``sparse_format_bytes``: what those weights would take in the format that suits the method
    (CSR with fp16 values for unstructured pruning; 2:4 with fp16 values, or int8 values plus one
    fp16 scale per row for ``2:4+int8``), to set beside ``fp16_weight_bytes``: the dense tensors
    with zeros in ``weight_bytes`` save nothing. ``matmul_speedup`` (2:4 methods, on a GPU):
    ``mlp_speedup`` in bf16, or int8 sparse against bf16 dense for ``2:4+int8``; otherwise
    ``matmul_speedup_skipped`` with the reason.
    """
    from labkit.quant import target_linears

    kind, _ = prune.method_spec(name)
    fields = {"sparsity": prune.model_sparsity(model)}
    if kind == "2:4+int8":
        layers = target_linears(model).values()
        fields["sparse_format"] = "2:4, int8 values, fp16 scale per row"
        fields["sparse_format_bytes"] = sum(
            prune.storage_bytes(m.dequantized_weight(), "2:4", value_bytes=1)
            + 2 * m.out_features for m in layers)
    else:
        fmt = "2:4" if kind == "2:4" else "csr"
        fields["sparse_format"] = f"{fmt}, fp16 values"
        fields["sparse_format_bytes"] = prune.model_storage_bytes(model, fmt, value_bytes=2)
    if kind in ("2:4", "2:4+int8"):
        fields.update(mlp_speedup(model.config, "int8" if kind == "2:4+int8" else "bfloat16"))
    else:
        fields["matmul_speedup_skipped"] = UNSTRUCTURED
    return fields
