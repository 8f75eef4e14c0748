"""Timers synchronize and warm up, the profiler finds the matmuls and counts each op once, memory
formulas match tensors, the roofline has both ceilings."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

import labkit.device
from labkit import profiling, roofline

SMOLLM2 = dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               hidden_size=576)


@pytest.fixture
def sync_calls(monkeypatch):
    """Count device synchronizations (on CPU they are no-ops, so we count the calls)."""
    calls = []
    monkeypatch.setattr(labkit.device, "synchronize", lambda device=None: calls.append(device))
    return calls


def test_timer_synchronizes_before_and_after_the_block(sync_calls):
    with profiling.Timer() as t:
        time.sleep(0.01)
    assert len(sync_calls) == 2
    assert t.elapsed_s >= 0.01


def test_time_fn_warms_up_then_times_each_repeat(sync_calls):
    calls = []
    result = profiling.time_fn(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and len(result.samples_s) == 5
    assert len(sync_calls) == 2 * 5  # every timed call is synchronized at both ends
    assert result.min_s <= result.median_s <= max(result.samples_s)


def test_naive_time_never_synchronizes(sync_calls):
    assert 0.01 <= profiling.naive_time(lambda: time.sleep(0.01)) < 1.0  # it does time the call
    assert sync_calls == []


def test_without_warmup_the_first_call_pays_the_one_time_cost():
    state = {"cold": True}

    def fn():
        time.sleep(0.05 if state["cold"] else 0.001)  # e.g. compilation or lazy init
        state["cold"] = False

    result = profiling.time_fn(fn, warmup=0, repeats=4)
    assert result.samples_s[0] > 10 * result.median_s
    assert profiling.time_fn(fn, warmup=1, repeats=4).median_s < 0.01


def test_time_fn_rejects_bad_counts():
    with pytest.raises(ValueError, match="repeats=0"):
        profiling.time_fn(lambda: None, repeats=0)


def test_kv_bytes_per_token_of_smollm2_in_bf16():
    # 2 (K and V) * 30 layers * 3 KV heads * 64 dims * 2 bytes
    assert profiling.kv_cache_bytes_per_token(SMOLLM2, 2) == 23040


def test_kv_bytes_per_token_defaults_without_gqa_or_head_dim():
    cfg = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64)  # MHA, head_dim 16
    assert profiling.kv_cache_bytes_per_token(cfg, 4) == 2 * 2 * 4 * 16 * 4
    with pytest.raises(ValueError, match="num_hidden_layers"):
        profiling.kv_cache_bytes_per_token({"hidden_size": 64}, 2)


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("length", [1, 17, 64])
def test_kv_formula_matches_the_cache_tensors_a_forward_leaves(tiny_llama, length):
    with torch.inference_mode():
        out = tiny_llama(torch.randint(0, 128, (1, length)), use_cache=True)
    measured = profiling.kv_cache_tensor_bytes(out.past_key_values)
    assert measured == length * profiling.kv_cache_bytes_per_token(tiny_llama.config, 4)


def test_decode_roofline_batch_one_is_bandwidth_over_bytes_per_step():
    # 1 GB weights + 1000 tokens * 100 kB of KV cache, read at 1 TB/s
    assert roofline.decode_roofline(1e9, 1e5, 1000, 1, 1e12) == pytest.approx(1e12 / 1.1e9)
    assert roofline.decode_roofline(1e9, 1e5, 1000, 8, 1e12) == pytest.approx(8e12 / 1.8e9)


def test_decode_roofline_grows_with_batch_but_kv_reads_cap_it():
    bounds = [roofline.decode_roofline(1e9, 1e5, 1000, b, 1e12) for b in (1, 2, 4, 64, 4096)]
    assert bounds == sorted(bounds)
    assert bounds[-1] < 1e12 / (1e5 * 1000)  # the limit when KV reads dominate
    with pytest.raises(ValueError, match="batch_size=0"):
        roofline.decode_roofline(1e9, 1e5, 1000, 0, 1e12)


def test_measured_copy_bandwidth_is_plausible():
    bw = roofline.measure_memory_bandwidth(size_bytes=16 * 2**20, repeats=3, device="cpu")
    assert 1e8 < bw < 1e13  # between 0.1 GB/s and 10 TB/s


def test_memory_bandwidth_on_cpu_is_measured_not_looked_up():
    bw, source = roofline.memory_bandwidth("cpu")
    assert 1e8 < bw < 1e13 and source == "measured copy"  # between 0.1 GB/s and 10 TB/s


@pytest.mark.parametrize("driver_name, hbm_bytes_per_s", [
    ("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H100 NVL", 3.9e12), ("NVIDIA H200", 4.8e12),
    ("NVIDIA A100-SXM4-80GB", 2.039e12), ("NVIDIA A100-PCIE-40GB", 1.555e12), ("Tesla T4", 320e9),
])
def test_memory_bandwidth_on_a_known_gpu_is_its_datasheet_figure(monkeypatch, driver_name,
                                                                 hbm_bytes_per_s):
    from labkit import device

    monkeypatch.setattr(device, "pick_device", lambda dev=None: torch.device("cuda"))
    monkeypatch.setattr(device, "device_name", lambda dev=None: driver_name)
    bw, source = roofline.memory_bandwidth()
    assert bw == hbm_bytes_per_s and source == f"datasheet ({device.gpu_spec(driver_name).name})"


def test_unknown_gpu_has_no_datasheet_figure():
    from labkit import device

    assert device.gpu_spec("NVIDIA GeForce GTX 1080") is None


def test_cpu_memory_usage_reports_rss_and_peak():
    usage = profiling.memory_usage("cpu")
    assert usage["device"] == "cpu"
    assert 0 < usage["rss_bytes"] <= usage["peak_rss_bytes"]


def test_profiler_table_names_the_matmuls_and_writes_a_trace(tiny_llama, tmp_path):
    ids = torch.randint(0, 128, (1, 16))
    trace = tmp_path / "trace.json"
    table = profiling.profile_ops(lambda: tiny_llama(ids), top=10, trace_path=trace,
                                  device="cpu")
    assert list(table.columns) == ["op", "calls", "self_cpu_ms", "cpu_total_ms"]
    assert 0 < len(table) <= 10
    assert table["self_cpu_ms"].is_monotonic_decreasing
    assert table["op"].str.contains("mm|linear").any()
    assert "traceEvents" in json.loads(trace.read_text())


def test_profile_ops_drops_kineto_banners_but_keeps_other_native_stderr(capfd):
    def fn():
        os.write(2, b"a real native warning\n")
        return torch.ones(8, 8) @ torch.ones(8, 8)

    profiling.profile_ops(fn, top=3, device="cpu", warmup=0)
    err = capfd.readouterr().err
    assert "USDT:" not in err and "a real native warning" in err


def test_profiler_table_counts_each_op_once(tiny_llama):
    ids = torch.randint(0, 128, (1, 16))
    table = profiling.profile_ops(lambda: tiny_llama(ids), top=50, device="cpu")
    assert table.attrs["sorted_by"] == "self_cpu_ms"
    assert table["self_cpu_ms"].sum() <= table.attrs["self_ms_sum"] + 1e-9
    # self times of ops do not overlap, so together they fit in the profiled call's wall time
    assert 0 < table.attrs["self_ms_sum"] <= table.attrs["wall_ms"] * 1.01


def test_op_events_leave_out_gpu_kernels_and_annotations():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(key, device_type, annotation=False):
        return SimpleNamespace(key=key, device_type=device_type, is_user_annotation=annotation)

    events = [event("aten::mm", DeviceType.CPU), event("sm90_xmma_gemm_bf16", DeviceType.CUDA),
              event("my_region", DeviceType.CPU, annotation=True),
              event("cudaLaunchKernel", DeviceType.CPU)]
    # the kernel's time is already the aten::mm row's CUDA time: one row per op, nothing twice
    assert [e.key for e in profiling.op_events(events)] == ["aten::mm", "cudaLaunchKernel"]


def test_ridge_point_is_where_the_two_ceilings_meet():
    peak, bw = 989e12, 4.8e12  # H200 datasheet: dense bf16, HBM
    ridge = roofline.ridge_point(peak, bw)
    assert ridge == pytest.approx(206.0, rel=1e-3)
    assert roofline.attainable_flops(1.0, peak, bw) == bw            # bandwidth-bound below
    assert roofline.attainable_flops(1000.0, peak, bw) == peak       # compute-bound above
    assert roofline.attainable_flops(ridge, peak, bw) == pytest.approx(peak)
    with pytest.raises(ValueError, match="bandwidth=0"):
        roofline.ridge_point(peak, 0)


def test_decode_roofline_compute_ceiling_caps_large_batches():
    # 1 GB of weights, no KV, 1 TB/s, 2 GFLOP per token, 100 TFLOP/s: the compute ceiling is
    # 50,000 tokens/s; bandwidth allows 1,000 x batch
    kw = dict(peak_flops_per_s=100e12, flops_per_token=2e9)
    assert roofline.decode_roofline(1e9, 0, 0, 1, 1e12, **kw) == pytest.approx(1000)
    assert roofline.decode_roofline(1e9, 0, 0, 4096, 1e12, **kw) == pytest.approx(50_000)
    with pytest.raises(ValueError, match="both"):
        roofline.decode_roofline(1e9, 0, 0, 1, 1e12, peak_flops_per_s=1e12)


def test_flops_per_token_is_two_per_matmul_weight_plus_attention(tiny_llama):
    params = roofline.matmul_params(tiny_llama)
    # 2 layers x (q, k, v, o, gate, up, down) + lm_head (tied or not, it is a matmul)
    per_layer = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * 64 * 128
    assert params == 2 * per_layer + 128 * 64
    f0 = roofline.flops_per_token(tiny_llama.config, params, 0)
    assert f0 == 2 * params
    assert roofline.flops_per_token(tiny_llama.config, params, 10) == f0 + 4 * 2 * 4 * 16 * 10


def test_decode_and_prefill_intensity():
    # fp32, 2 FLOPs per 4-byte weight: batch-1 decode does 0.5 FLOP per byte, batch 8 four times
    # that when the KV cache is negligible; a prefill of P tokens reads the weights once
    w = 4e9
    assert roofline.decode_intensity(1, 2e9, w, 0, 0) == pytest.approx(0.5)
    assert roofline.decode_intensity(8, 2e9, w, 0, 0) == pytest.approx(4.0)
    assert roofline.decode_intensity(8, 2e9, w, 1e5, 1e4) < 4.0  # KV reads lower it
    assert roofline.prefill_intensity(512, 2e9, w, 0) == pytest.approx(256.0)


def test_compute_peak_on_cpu_is_measured_and_on_a_known_gpu_is_the_datasheet(monkeypatch):
    flops, source = roofline.compute_peak("cpu")
    assert 1e8 < flops < 1e15 and source == "measured matmul"
    from labkit import device

    monkeypatch.setattr(device, "pick_device", lambda dev=None: torch.device("cuda"))
    monkeypatch.setattr(device, "device_name", lambda dev=None: "NVIDIA H200")
    assert roofline.compute_peak() == (989e12, "datasheet bf16 (NVIDIA H200)")


def test_roofline_plot_draws_both_ceilings_and_the_ridge():
    import matplotlib

    matplotlib.use("Agg")
    from labkit import plots

    ax = plots.roofline_plot(989e12, 4.8e12, {"decode (batch size)": ([1.0, 15.0], [3e11, 6e12])},
                             labels={"decode (batch size)": [1, 16]}, title="H200")
    ridge_lines = [line for line in ax.lines if list(line.get_xdata()) == [206.04166666666666] * 2]
    assert ridge_lines, "a vertical line at the ridge point (989e12 / 4.8e12 FLOP/byte)"
    roof = ax.lines[0].get_ydata()
    assert max(roof) == pytest.approx(989.0)  # the compute ceiling, in TFLOP/s
    assert "ridge 206 FLOP/byte" in [t.get_text() for t in ax.texts]
    assert ax.get_xlabel() == "arithmetic intensity (FLOP/byte)"
    with pytest.raises(ValueError, match="2 x values but 1 y"):
        plots.roofline_plot(1e12, 1e11, {"bad": ([1, 2], [3])})
