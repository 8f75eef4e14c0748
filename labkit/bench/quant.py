"""``labkit bench quant``: every quantization method measured for size, speed and quality together.

- ``run_quant_bench``: each method of ``labkit.quant_methods`` applied to a copy of a real model:
  the bytes of its linear layers (``labkit.sizes.weight_bytes(..., layers="linear")``, and the
  same layers in fp16), perplexity, batch-1 and large-batch decode tokens/s, and agreement with
  the fp32 model's greedy tokens; ``bench_table`` and ``plot_tradeoff`` show the result.
- ``run_decode_speed_bench``: batch-1 decode speed of each weight format on the fastest path of
  its engine (compiled static-cache loop, or vLLM), against the memory-bandwidth roofline, with
  the bytes the whole quantized model holds.

Pruning methods (``labkit.prune``: ``magnitude-50``, ``global-50``, ``2:4``, ``2:4+int8``, ...)
are rows of ``run_quant_bench`` too, measured the same way plus ``labkit.bench.prune``'s
``pruning_fields`` (``sparsity``, sparse-format bytes, ``matmul_speedup`` on a GPU).

Used by the quantization lab (lab 04); a method that cannot run here is a ``skipped`` row.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from functools import partial

import torch

from labkit import prune
from labkit.bench.prune import pruning_fields
from labkit.config import DEFAULT_MODEL
from labkit.quant_methods import DEFAULT_METHODS, Method, get_method
from labkit.sizes import checkpoint_bytes, weight_bytes
from labkit.widgets import Progress


def method_of(name: str) -> Method:
    """The ``labkit.quant_methods`` entry of ``name``, or a ``labkit.prune`` method as one (it
    runs anywhere); a ValueError names the known forms of both."""
    if prune.is_method(name):
        return Method(name, prune.describe(name), lambda device: None,
                      partial(prune.apply_method, name=name))
    try:
        return get_method(name)
    except ValueError as err:
        raise ValueError(f"{err}; or a pruning method: {prune.METHOD_FORMS}") from None


def run_quant_bench(model: str = DEFAULT_MODEL, methods: Iterable[str] | None = None,
                    device: str | None = None, *, max_eval_tokens: int | None = None,
                    window: int = 512, stride: int = 256, decode_tokens: int = 32,
                    b1_requests: int = 2, large_batch: int = 16, agreement_tokens: int = 16,
                    progress: bool = True) -> dict:
    """Measure each method on ``model`` and return the ``quant`` bench JSON document.

    Per method (a copy of the fp32 model, quantized): ``weight_bytes`` / ``fp16_weight_bytes``
    of the target linear layers, ``perplexity`` on the evaluation text (first
    ``max_eval_tokens`` tokens), batch-1 greedy decode tokens/s over ``b1_requests`` requests of
    ``decode_tokens`` tokens (after a warm-up; the contract's latency fields come from these),
    ``decode_tokens_per_s_large`` at ``large_batch``, ``agreement`` with the fp32 model's
    greedy tokens, and ``measure_s``: the wall time it took to quantize and measure it (s).
    Pruning rows add ``pruning_fields``. Default methods: every default of
    ``labkit.quant_methods`` and of ``labkit.prune``. A method that cannot run here, or fails, is
    a run with ``"skipped": reason``.
    """
    import copy
    import gc

    from labkit import quality
    from labkit.device import pick_device
    from labkit.metrics import bench_document
    from labkit.models import load_model

    names = list(methods) if methods is not None else [*DEFAULT_METHODS, *prune.DEFAULT_METHODS]
    for name in names:
        method_of(name)  # unknown names fail before any work
    dev = pick_device(device)
    base, tok, _ = load_model(model, dev, "float32")
    ids = quality.eval_token_ids(tok, max_eval_tokens)
    reference = quality.greedy_outputs(base, tok, max_new_tokens=agreement_tokens)
    settings = {"eval_tokens": len(ids), "window": window, "stride": stride,
                "decode_tokens": decode_tokens, "large_batch_size": large_batch,
                "agreement_prompts": len(reference), "agreement_tokens": agreement_tokens}
    runs = []
    for name in Progress.wrap(names, "quant methods", progress):
        method = method_of(name)
        reason = method.can_run(dev)
        if reason is None and method.apply is None:
            reason = f"runs inside the {method.engine} engine: labkit.engines.get_engine(" \
                     f"{method.engine!r}, **{method.engine_kwargs}); not measured by this bench"
        if reason is not None:
            runs.append({"name": name, "description": method.description, "skipped": reason})
            continue
        qmodel, start = None, time.perf_counter()
        try:
            qmodel = method.apply(copy.deepcopy(base))
            run = _measure(qmodel, tok, ids, reference, window, stride, decode_tokens,
                           b1_requests, large_batch, agreement_tokens)
            run.update(name=name, description=method.description)
            if prune.is_method(name):
                run.update(pruning_fields(qmodel, name))
        except Exception as err:  # noqa: BLE001 - one broken method never stops the table
            run = {"name": name, "description": method.description,
                   "skipped": f"failed here: {type(err).__name__}: {err}"}
        finally:
            del qmodel
            gc.collect()
        run["measure_s"] = time.perf_counter() - start  # applying and measuring it, wall time
        runs.append(run)
    return bench_document("quant", runs, engine="hf", model=model, device=_device_label(dev),
                          settings=settings)


def _device_label(dev: torch.device) -> str:
    from labkit.device import device_name

    return device_name(dev)


def _measure(qmodel, tok, ids, reference, window, stride, decode_tokens, b1_requests,
             large_batch, agreement_tokens) -> dict:
    """One method's run entry (see ``run_quant_bench``)."""
    from labkit import quality
    from labkit.metrics import summarize

    wb = weight_bytes(qmodel, layers="linear")
    fb = weight_bytes(qmodel, layers="linear", as_dtype=torch.float16)
    ppl = quality.perplexity(qmodel, ids, window, stride)
    agree = quality.agreement(reference, quality.greedy_outputs(
        qmodel, tok, max_new_tokens=agreement_tokens))
    timed_generate(qmodel, tok, 1, 2)  # warm-up: lazy init, first-call allocations
    b1 = [c for _ in range(b1_requests) for c in timed_generate(qmodel, tok, 1, decode_tokens)]
    duration = sum(c.e2e_s for c in b1)
    timed_generate(qmodel, tok, large_batch, 2)
    big = timed_generate(qmodel, tok, large_batch, decode_tokens)
    return summarize(
        b1, duration, name="", batch_size=1,
        weight_bytes=wb, fp16_weight_bytes=fb, weight_ratio_vs_fp16=wb / fb,
        perplexity=ppl, decode_tokens_per_s_b1=_decode_rate(b1, 1),
        decode_tokens_per_s_large=_decode_rate(big, large_batch), large_batch_size=large_batch,
        agreement=agree["exact"], agreement_prefix_tokens=agree["mean_prefix_tokens"])


DECODE_PROMPT = "Write a short story about a lighthouse keeper."


def timed_generate(model, tokenizer, batch_size: int = 1, max_new_tokens: int = 32,
                   prompt: str = DECODE_PROMPT) -> list:
    """Greedy-decode ``max_new_tokens`` tokens (EOS ignored) for ``batch_size`` copies of one
    chat prompt; returns labkit ``Completion`` objects whose token times are stamped on the host as
    each step's tokens arrive (so TTFT/TPOT/ITL are wall-clock seconds)."""
    from labkit.engines.base import Completion, now

    ids = list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=True,
                                             return_dict=False))
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids] * batch_size, device=device)
    stamps = _Stamps()
    start = now()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id, streamer=stamps)
    end = now()
    new = out[:, len(ids):].tolist()
    return [Completion(request_id=f"quant-{i}", text="", token_ids=row, prompt_tokens=len(ids),
                       finish_reason="length", start_s=start, token_times_s=list(stamps.times),
                       end_s=end) for i, row in enumerate(new)]


class _Stamps:
    """A ``generate`` streamer that only records when each decode step's tokens reach the host
    (generate hands the streamer CPU tensors, so the device has finished that step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        from labkit.engines.base import now

        if not self._prompt_seen:  # the first put is the prompt
            self._prompt_seen = True
            return
        self.times.append(now())

    def end(self) -> None:
        pass


def _decode_rate(completions, batch_size: int) -> float:
    """Decode tokens/s at ``batch_size``: rows per step / mean TPOT (first token excluded)."""
    tpots = [c.tpot_s for c in completions if c.tpot_s]
    return batch_size / (sum(tpots) / len(tpots)) if tpots else float("nan")


def bench_table(doc: dict):
    """The runs of a ``quant`` bench document as a small pandas table (n/a + reason rows). With
    pruning rows, also their ``sparsity``, the sparse format's bytes as a fraction of fp16
    (``sparse_x_fp16``) and ``matmul_speedup`` (n/a where not timed)."""
    import pandas as pd

    nan = float("nan")
    big = doc.get("settings", {}).get("large_batch_size", "N")
    pruned = any("sparsity" in r for r in doc["runs"])
    rows = []
    for r in doc["runs"]:
        row = {
            "method": r["name"],
            "weight_MB": r.get("weight_bytes", nan) / 1e6,
            "x_fp16": r.get("weight_ratio_vs_fp16", nan),
            "perplexity": r.get("perplexity", nan),
            "tok/s b1": r.get("decode_tokens_per_s_b1", nan),
            f"tok/s b{big}": r.get("decode_tokens_per_s_large", nan),
            "agreement": r.get("agreement", nan),
            "measure_s": r.get("measure_s", nan),
        }
        if pruned:
            row.update(sparsity=r.get("sparsity", nan),
                       sparse_x_fp16=r.get("sparse_format_bytes", nan)
                       / r.get("fp16_weight_bytes", nan),
                       matmul_speedup=r.get("matmul_speedup", nan))
        rows.append({**row, "skipped": r.get("skipped", "")})
    return pd.DataFrame(rows).set_index("method")


def plot_tradeoff(doc: dict, x: str = "weight_bytes", ax=None):
    """Scatter of ``x`` (``weight_bytes`` or ``decode_tokens_per_s_b1``) against perplexity for
    the runs of a ``quant`` bench document that ran; each point labelled with its method."""
    import matplotlib.pyplot as plt

    labels = {"weight_bytes": "weight bytes of the linear layers (MB)",
              "decode_tokens_per_s_b1": "decode tokens/s at batch 1",
              "decode_tokens_per_s_large": "decode tokens/s at a large batch"}
    if x not in labels:
        raise ValueError(f"unknown x {x!r}; choose one of: {', '.join(labels)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.8))
    scale = 1e-6 if x == "weight_bytes" else 1.0
    for run in doc["runs"]:
        if "skipped" in run:
            continue
        ax.scatter(run[x] * scale, run["perplexity"])
        ax.annotate(run["name"], (run[x] * scale, run["perplexity"]), fontsize=8,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel(labels[x])
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(f"{doc['model']} on {doc['device']}")
    return ax


def run_decode_speed_bench(model: str = "synthetic-8b",
                           methods: Iterable[str] = ("bf16", "int8-wo", "int4-wo", "fp8"),
                           *, prompt_len: int = 128, out_len: int = 128, requests: int = 2,
                           compile: bool = True, progress: bool = True) -> dict:
    """Batch-1 decode tokens/s of each weight format on the fastest path of its engine.

    Quantized weights pay off on a GPU only when decode is memory-bound, so the Python overhead
    of ``generate`` must be gone first: each method runs in labkit's static-cache decode loop,
    compiled to CUDA graphs (``HFEngine(static_cache=True, compile=True)``), and ``fp8`` runs in
    vLLM (``quantization="fp8"``, CUDA graphs). Synthetic models have random weights, so this
    bench measures speed and bytes only; quality comes from ``run_quant_bench`` on real weights.
    Each run has the contract's latency fields plus ``decode_tokens_per_s_b1``, ``weight_bytes``
    (everything the quantized model holds, ``labkit.sizes.weight_bytes``; for vLLM fp8 counted
    from the checkpoint with 1-byte linear weights, ``checkpoint_bytes``) and the roofline
    fields of ``labkit.bench.latency.roofline_fields``.
    """
    import gc
    from functools import partial

    from labkit.bench.latency import roofline_fields
    from labkit.bench.workloads import prompt_of_length
    from labkit.device import pick_device
    from labkit.engines import Request, get_engine
    from labkit.metrics import bench_document, summarize

    dev = pick_device()
    runs = []
    for name in Progress.wrap(methods, "decode speed", progress):
        method = get_method(name)
        reason = method.can_run(dev)
        if reason is not None:
            runs.append({"name": name, "skipped": reason})
            continue
        engine = None
        try:
            if method.apply is None:  # runs inside its engine (vLLM fp8)
                engine = get_engine(method.engine, model=model, **method.engine_kwargs)
                wbytes = checkpoint_bytes(engine.ref.path, linear_element_bytes=1)
            else:
                engine = get_engine("hf", model=model, dtype="bfloat16", static_cache=True,
                                    compile=compile)
                engine.model = engine.decoder.model = method.apply(engine.model)
                wbytes = weight_bytes(engine.model)
            text = prompt_of_length(engine.tokenizer, prompt_len)
            req = partial(Request, prompt=text, max_tokens=out_len, ignore_eos=True)
            engine.generate([req()])  # warm-up: compilation and CUDA-graph capture
            engine.generate([req()])
            done = [engine.generate([req()])[0] for _ in range(requests)]
            run = summarize(done, sum(c.e2e_s for c in done), name=name, batch_size=1,
                            concurrency=1, engine=engine.name)
            run.update(roofline_fields(engine, run["tpot_s"]["mean"], prompt_len + out_len / 2,
                                       weight_bytes=wbytes))
            run["decode_tokens_per_s_b1"] = run["decode_tokens_per_s"]
            runs.append(run)
        except Exception as err:  # noqa: BLE001 - one broken method never stops the table
            runs.append({"name": name, "skipped": f"failed here: {type(err).__name__}: {err}"})
        finally:
            if engine is not None:
                engine.close()
            del engine
            gc.collect()
    return bench_document("quant", runs, engine="hf-static-compile", model=model,
                          settings={"prompt_len": prompt_len, "out_len": out_len,
                                    "compile": compile})

