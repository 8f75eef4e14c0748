"""Timers synchronize and warm up, the profiler finds the matmuls, memory formulas match tensors."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

import labkit.device
from labkit import profiling

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
    assert profiling.decode_roofline(1e9, 1e5, 1000, 1, 1e12) == pytest.approx(1e12 / 1.1e9)
    assert profiling.decode_roofline(1e9, 1e5, 1000, 8, 1e12) == pytest.approx(8e12 / 1.8e9)


def test_decode_roofline_grows_with_batch_but_kv_reads_cap_it():
    bounds = [profiling.decode_roofline(1e9, 1e5, 1000, b, 1e12) for b in (1, 2, 4, 64, 4096)]
    assert bounds == sorted(bounds)
    assert bounds[-1] < 1e12 / (1e5 * 1000)  # the limit when KV reads dominate
    with pytest.raises(ValueError, match="batch_size=0"):
        profiling.decode_roofline(1e9, 1e5, 1000, 0, 1e12)


def test_measured_copy_bandwidth_is_plausible():
    bw = profiling.measure_memory_bandwidth(size_bytes=16 * 2**20, repeats=3, device="cpu")
    assert 1e8 < bw < 1e13  # between 0.1 GB/s and 10 TB/s


def test_memory_bandwidth_on_cpu_is_measured_not_looked_up():
    bw, source = profiling.memory_bandwidth("cpu")
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
    bw, source = profiling.memory_bandwidth()
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
