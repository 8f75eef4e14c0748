"""Quantization from scratch: error bounds, exact byte counts, int4 packing, the method registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from labkit import quant, quant_methods, sizes
from labkit.bench import quant as quant_bench


def _weight_with_outlier_row(seed: int = 0) -> torch.Tensor:
    """Gaussian weights with one row 100x larger: one big value stretches a shared scale."""
    torch.manual_seed(seed)
    w = torch.randn(64, 128) * 0.02
    w[5] *= 100.0
    return w


def test_int8_round_trip_error_is_at_most_half_a_step():
    w = torch.randn(32, 64)
    for per_channel in (False, True):
        q, scale = quant.quantize_int8(w, per_channel=per_channel)
        assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
        err = (quant.dequantize_int8(q, scale) - w).abs()
        assert torch.all(err <= scale.float() / 2 * 1.01 + 1e-7)


def test_per_channel_beats_per_tensor_when_one_row_is_an_outlier():
    w = _weight_with_outlier_row()
    per_tensor = quant.dequantize_int8(*quant.quantize_int8(w, per_channel=False))
    per_channel = quant.dequantize_int8(*quant.quantize_int8(w, per_channel=True))
    normal_rows = [i for i in range(w.shape[0]) if i != 5]
    e_tensor = (per_tensor - w)[normal_rows].pow(2).mean().sqrt()
    e_channel = (per_channel - w)[normal_rows].pow(2).mean().sqrt()
    assert e_channel <= e_tensor / 10  # the ordinary rows got a 100x finer grid
    assert quant.quantization_error(w, per_channel)["rms"] <= \
        quant.quantization_error(w, per_tensor)["rms"]


def test_int4_groups_confine_an_outlier_to_its_group():
    w = torch.randn(8, 128) * 0.02
    w[:, 3] = 2.0  # an outlier input column: only group 0 of each row sees it
    g32 = quant.dequantize_int4(quant.quantize_int4(w, 32))
    g128 = quant.dequantize_int4(quant.quantize_int4(w, 128))
    rest = slice(32, 128)
    assert (g32 - w)[:, rest].abs().mean() < (g128 - w)[:, rest].abs().mean() / 5


def test_byte_counts_match_hand_computation():
    # int8 [4096, 1024]: 4 Mi codes of 1 byte + one fp16 scale per row (or one in all)
    assert quant.int8_bytes((4096, 1024), per_channel=True) == 4096 * 1024 + 2 * 4096
    assert quant.int8_bytes((4096, 1024), per_channel=False) == 4096 * 1024 + 2
    # int4 [576, 1536], g32: half a byte per code; 576 * 48 groups, each 2 B scale (+ 2 B zero)
    assert quant.int4_bytes((576, 1536), 32, symmetric=True) == 442_368 + 27_648 * 2
    assert quant.int4_bytes((576, 1536), 32, symmetric=False) == 442_368 + 27_648 * 4
    # asymmetric g32: (16 + 2 + 2) bytes per 32 weights = 0.3125 of fp16's 64 bytes
    assert quant.int4_bytes((64, 64), 32) / (2 * 64 * 64) == pytest.approx(0.3125)


def test_stored_bytes_equal_the_formulas():
    lin = nn.Linear(128, 64, bias=False)
    for scheme, expected in [("int8-tensor", quant.int8_bytes((64, 128), False)),
                             ("int8-channel", quant.int8_bytes((64, 128), True)),
                             ("int4-sym", quant.int4_bytes((64, 128), 32, True)),
                             ("int4", quant.int4_bytes((64, 128), 32, False))]:
        assert quant.QuantLinear(lin, scheme).weight_nbytes() == expected, scheme


def test_int4_packing_round_trip_is_exact():
    codes = torch.randint(0, 16, (7, 10), dtype=torch.uint8)
    packed = quant.pack_int4(codes)
    assert packed.shape == (7, 5) and packed.dtype == torch.uint8
    assert torch.equal(quant.unpack_int4(packed), codes)
    assert quant.pack_int4(torch.tensor([1, 2], dtype=torch.uint8)).item() == 0x21
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        quant.pack_int4(torch.tensor([16, 0]))


@pytest.mark.parametrize("symmetric", [True, False])
def test_representable_int4_weights_survive_exactly(symmetric):
    # weights that are already on a group's int4 grid (scale 0.25, codes spanning the range)
    torch.manual_seed(0)
    if symmetric:
        codes = torch.randint(-7, 8, (4, 64)).float()
        codes[:, ::32] = 7  # each group reaches +7, so max|w| / 7 recovers the scale exactly
        w = codes * 0.25
    else:
        codes = torch.randint(0, 16, (4, 64)).float()
        codes[:, ::32], codes[:, 1::32] = 0, 15  # each group spans the full [0, 15]
        w = codes * 0.25 - 1.0
    qw = quant.quantize_int4(w, 32, symmetric=symmetric)
    assert torch.equal(quant.dequantize_int4(qw), w)
    assert qw.nbytes() == quant.int4_bytes((4, 64), 32, symmetric)


def test_bad_group_size_names_the_value():
    with pytest.raises(ValueError, match="group_size.*in_features=100"):
        quant.quantize_int4(torch.randn(4, 100), 32)


def test_quantized_model_reports_bytes_of_its_linear_layers():
    model = nn.Sequential(nn.Linear(64, 128, bias=False), nn.ReLU(), nn.Linear(128, 64))
    x = torch.randn(3, 64)
    y = model(x)
    fp16 = sizes.weight_bytes(model, layers="linear", as_dtype=torch.float16)
    assert fp16 == 2 * (64 * 128 + 128 * 64)
    assert sizes.weight_bytes(model, layers="linear") == 2 * fp16  # fp32 now
    quant.quantize_linears(model, "int4")
    assert all(isinstance(m, quant.QuantLinear) for m in (model[0], model[2]))
    assert model[0].qweight.dtype == torch.uint8  # really stores packed codes
    held = sizes.weight_bytes(model, layers="linear")
    assert held == (quant.int4_bytes((128, 64)) + quant.int4_bytes((64, 128)))
    assert held <= 0.32 * fp16
    assert torch.allclose(model(x), y, atol=0.1)


def test_lm_head_is_skipped_by_default():
    model = nn.Module()
    model.proj = nn.Linear(32, 32)
    model.lm_head = nn.Linear(32, 100)
    assert list(quant.target_linears(model)) == ["proj"]
    quant.quantize_linears(model, "int8-channel")
    assert isinstance(model.proj, quant.QuantLinear) and isinstance(model.lm_head, nn.Linear)


def test_method_that_cannot_run_here_gives_a_reason_instead_of_raising():
    reason = quant_methods.get_method("int4-wo").can_run(torch.device("cpu"))
    assert reason is not None and "CUDA" in reason
    assert "CUDA" in quant_methods.cannot_run("fp8", "cpu")
    assert quant_methods.cannot_run("int8-channel", "cpu") is None


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown quantization method 'int3'.*int8-channel"):
        quant_methods.get_method("int3")


def test_torchao_int8_weight_only_bytes_are_counted_from_its_tensors():
    pytest.importorskip("torchao")
    model = nn.Sequential(nn.Linear(64, 32, bias=False))
    quant_methods.get_method("int8-wo").apply(model)
    assert type(model[0].weight) is not nn.Parameter  # torchao swapped in a tensor subclass
    # 1 byte per code, one fp32 scale per output row, and an int8 zero point per row that
    # torchao stores even for this symmetric scheme (all zeros): bytes held, counted honestly
    assert sizes.weight_bytes(model, layers="linear") == 64 * 32 + 32 * 4 + 32 * 1


@pytest.mark.slow
def test_quant_bench_follows_the_contract_and_skips_what_cannot_run():
    doc = quant_bench.run_quant_bench(
        "smollm2-135m", ["fp32", "int8-channel", "int4-wo"], device="cpu", max_eval_tokens=64,
        window=64, stride=64, decode_tokens=3, b1_requests=1, large_batch=2,
        agreement_tokens=2, progress=False)
    assert doc["bench"] == "quant" and doc["device"] == "cpu"
    runs = {r["name"]: r for r in doc["runs"]}
    assert "CUDA" in runs["int4-wo"]["skipped"]
    for name in ("fp32", "int8-channel"):
        run = runs[name]
        for key in ("num_requests", "output_tokens", "duration_s", "requests_per_s",
                    "output_tokens_per_s", "weight_bytes", "fp16_weight_bytes", "perplexity",
                    "decode_tokens_per_s_b1", "decode_tokens_per_s_large", "agreement"):
            assert key in run, (name, key)
        assert set(run["ttft_s"]) == {"mean", "p50", "p90", "p99"}
        assert run["output_tokens"] == 3
        assert 0 < run["duration_s"] < run["measure_s"]  # its timed decodes are part of it
    assert "measure_s" not in runs["int4-wo"]  # skipped before any work
    assert runs["fp32"]["agreement"] == 1.0  # the reference agrees with itself
    assert runs["int8-channel"]["weight_bytes"] < 0.51 * runs["int8-channel"]["fp16_weight_bytes"]
