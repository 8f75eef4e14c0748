"""Measure before you optimise: timers that synchronize, the op profiler, memory, decode roofline.

- ``Timer`` / ``time_fn``: wall-clock seconds of work *finished* on the device. A GPU runs kernels
  asynchronously: a Python call returns once its kernels are queued, so a clock read without
  ``synchronize`` measures launch time, not compute. ``naive_time`` is that wrong way, kept
  only to show the trap. ``time_fn`` also warms up first, so lazy init and compilation stay out.
- ``profile_ops``: torch.profiler's per-op table (time in ms) and an optional Chrome trace.
- ``memory_usage``: CUDA allocated/peak bytes from torch, or the process RSS on CPU (/proc).
- ``kv_cache_bytes_per_token``, ``kv_cache_tensor_bytes``: the KV cache's formula and the bytes
  its tensors hold. The bounds these feed (bandwidth and compute ceilings, the ridge point) are
  ``labkit.roofline``.

torch is imported inside functions, so ``import labkit.profiling`` stays cheap.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TimingResult:
    """Wall-clock times of ``repeats`` calls after warm-up, in seconds."""

    median_s: float
    mean_s: float
    stdev_s: float
    min_s: float
    samples_s: tuple[float, ...]


def _sync(device) -> None:
    from labkit.device import synchronize

    synchronize(device)


class Timer:
    """Context manager timing a block in seconds, synchronizing the device at both ends.

    >>> with Timer() as t:
    ...     y = model(x)
    >>> t.elapsed_s
    """

    def __init__(self, device=None) -> None:
        self.device = device
        self.start_s = 0.0
        self.elapsed_s = float("nan")

    def __enter__(self) -> Timer:
        _sync(self.device)  # earlier queued work must not be billed to this block
        self.start_s = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        _sync(self.device)  # wait until the block's kernels have actually run
        self.elapsed_s = time.perf_counter() - self.start_s


def time_fn(fn: Callable[[], Any], warmup: int = 2, repeats: int = 5,
            device=None) -> TimingResult:
    """Call ``fn()`` ``warmup`` times untimed, then time ``repeats`` calls, each synchronized.

    ``warmup=0`` keeps the first (cold) call in ``samples_s[0]``: that is how to see the
    first-call trap. Times are seconds of wall clock per call.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup!r}, "
                         f"repeats={repeats!r}")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        with Timer(device) as t:
            fn()
        samples.append(t.elapsed_s)
    return TimingResult(median_s=statistics.median(samples), mean_s=statistics.fmean(samples),
                        stdev_s=statistics.stdev(samples) if len(samples) > 1 else 0.0,
                        min_s=min(samples), samples_s=tuple(samples))


def naive_time(fn: Callable[[], Any]) -> float:
    """THE WRONG WAY, for the lesson only: one call, no warm-up, no device synchronize (s).

    On a GPU this returns as soon as the kernels are *queued*: it measures launch overhead and can
    be orders of magnitude below the real time. On CPU work is synchronous, so it only misses the
    warm-up. Use ``time_fn`` or ``Timer`` for every number you report.
    """
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- the op profiler ---------------------------------------------------------------------------

PROFILE_COLUMNS = ("op", "calls", "self_cpu_ms", "cpu_total_ms", "cuda_total_ms", "self_cuda_ms")


KINETO_BANNERS = ("USDT:", "STAGE:")  # kineto's native start/stop lines, not errors


@contextlib.contextmanager
def _without_kineto_banners():
    """Hold native stderr (fd 2) while the profiler runs and pass on every line except kineto's
    ``USDT:``/``STAGE:`` banners, which ``KINETO_LOG_LEVEL`` does not silence."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(True)
                    if not line.startswith(KINETO_BANNERS)]
            if kept:
                sys.stderr.write("".join(kept))


def op_events(events) -> list:
    """The operator rows of a profiler's ``key_averages()``: events recorded on the CPU side
    (``aten::`` ops, runtime calls) that are not user annotations. GPU kernel events are
    dropped: their time already shows in the CUDA columns of the op that launched them."""
    from torch.autograd import DeviceType

    return [ev for ev in events
            if ev.device_type == DeviceType.CPU and not ev.is_user_annotation]


def profile_ops(fn: Callable[[], Any], top: int = 15, trace_path: str | Path | None = None,
                device=None, warmup: int = 1):
    """Profile one call of ``fn`` with torch.profiler; the ``top`` ops as a DataFrame.

    Columns: op, calls, self_cpu_ms, cpu_total_ms and, when CUDA was used, cuda_total_ms and
    self_cuda_ms (all milliseconds). Sorted by device time on a GPU, self CPU time otherwise.
    One row per op (``aten::mm``, ...) and nothing else: the GPU kernels an op launches are
    already in its CUDA columns, so their own rows (and user annotations such as
    ``record_function`` ranges) are left out, and each millisecond of a ``self_`` column is
    counted once: summed over all ops it is at most the call's wall time. ``*_total_ms``
    include the ops an op calls (``aten::linear`` contains its ``aten::mm``): never sum those.
    ``frame.attrs`` holds ``self_ms_sum`` (the sort column summed over *all* ops, not only the
    top ones) and ``wall_ms`` (the profiled call, synchronized), so shares can be computed.
    ``trace_path`` writes a Chrome trace (open it in chrome://tracing or ui.perfetto.dev).
    """
    import pandas as pd
    import torch
    from torch.profiler import ProfilerActivity, profile

    from labkit.device import pick_device

    dev = pick_device(device)
    activities = [ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    for _ in range(warmup):
        fn()
    _sync(dev)
    # one cycle: acc_events keeps torch from warning that a new cycle clears the old one's events
    with _without_kineto_banners(), torch.inference_mode(), \
            profile(activities=activities, record_shapes=False, acc_events=True) as prof:
        start = time.perf_counter()
        fn()
        _sync(dev)
        wall_s = time.perf_counter() - start
    rows = []
    for ev in op_events(prof.key_averages()):
        row = {"op": ev.key, "calls": int(ev.count),
               "self_cpu_ms": ev.self_cpu_time_total / 1e3,
               "cpu_total_ms": ev.cpu_time_total / 1e3}
        if dev.type == "cuda":
            row["cuda_total_ms"] = getattr(ev, "device_time_total", 0.0) / 1e3
            row["self_cuda_ms"] = getattr(ev, "self_device_time_total", 0.0) / 1e3
        rows.append(row)
    frame = pd.DataFrame(rows)
    sort_by = "self_cuda_ms" if dev.type == "cuda" else "self_cpu_ms"
    self_ms_sum = float(frame[sort_by].sum())
    frame = frame.sort_values(sort_by, ascending=False).head(top).reset_index(drop=True)
    frame.attrs.update(self_ms_sum=self_ms_sum, wall_ms=wall_s * 1e3, sorted_by=sort_by)
    if trace_path is not None:
        Path(trace_path).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_path))
    return frame


# --- memory ------------------------------------------------------------------------------------

def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_usage(device=None) -> dict[str, int | str]:
    """Current and peak memory of this process on ``device``, in bytes.

    CUDA: ``allocated_bytes`` / ``peak_allocated_bytes`` (tensors torch holds) and
    ``reserved_bytes`` (its caching allocator's pool). CPU: ``rss_bytes`` / ``peak_rss_bytes`` of
    the whole process from /proc/self/status (VmRSS / VmHWM), falling back to getrusage's peak.
    """
    from labkit.device import pick_device

    dev = pick_device(device)
    if dev.type == "cuda":
        import torch

        return {"device": str(dev), "allocated_bytes": torch.cuda.memory_allocated(dev),
                "peak_allocated_bytes": torch.cuda.max_memory_allocated(dev),
                "reserved_bytes": torch.cuda.memory_reserved(dev)}
    rss, peak = _proc_status_bytes("VmRSS"), _proc_status_bytes("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
    return {"device": "cpu", "rss_bytes": rss if rss is not None else peak,
            "peak_rss_bytes": peak}


def reset_peak_memory(device=None) -> None:
    """Start a new CUDA peak-memory window (CPU's peak RSS cannot be reset)."""
    from labkit.device import pick_device

    dev = pick_device(device)
    if dev.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(dev)


def config_field(config, key: str, default=None):
    """``config.key`` of a transformers config, or ``config[key]`` of a dict; ``default`` if
    absent."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def kv_cache_bytes_per_token(config, dtype_bytes: int | float) -> int:
    """Bytes of KV cache one token adds: 2 (K and V) * layers * kv_heads * head_dim * dtype bytes.

    ``config`` is a transformers config or a dict with ``num_hidden_layers``,
    ``num_key_value_heads`` (default: ``num_attention_heads``, i.e. no GQA) and ``head_dim``
    (default: ``hidden_size // num_attention_heads``). bf16/fp16: ``dtype_bytes=2``.
    """
    text = config_field(config, "text_config")  # multimodal configs nest the language model's
    if text is not None and config_field(config, "num_hidden_layers") is None:
        config = text
    layers = config_field(config, "num_hidden_layers")
    heads = config_field(config, "num_attention_heads")
    if layers is None or heads is None:
        raise ValueError("config needs num_hidden_layers and num_attention_heads; got "
                         f"{type(config).__name__} without them")
    kv_heads = config_field(config, "num_key_value_heads") or heads
    head_dim = config_field(config, "head_dim") or config_field(config, "hidden_size") // heads
    if dtype_bytes <= 0:
        raise ValueError(f"dtype_bytes must be > 0 (e.g. 2 for bf16), got {dtype_bytes!r}")
    return int(2 * layers * kv_heads * head_dim * dtype_bytes)


def kv_cache_tensor_bytes(past_key_values) -> int:
    """Bytes actually held by a transformers KV cache (a forward's ``past_key_values``)."""
    layers = getattr(past_key_values, "layers", None)
    if layers is not None:
        pairs = [(layer.keys, layer.values) for layer in layers]
    else:  # legacy tuple of (k, v) per layer
        pairs = list(past_key_values)
    return sum(t.numel() * t.element_size() for pair in pairs for t in pair if t is not None)
