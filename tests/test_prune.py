"""Pruning from scratch: masks that keep what they claim, sparsity as asked, bytes counted
honestly, named methods for the bench, and quality that falls as sparsity grows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from labkit import prune, quant
from labkit.bench import prune as prune_bench
from labkit.bench import quant as quant_bench


def _two_layer_model() -> nn.Module:
    """Two linear layers whose weights differ in scale, and an lm_head that must stay dense."""
    torch.manual_seed(0)
    model = nn.Module()
    model.small = nn.Linear(64, 32, bias=False)
    model.large = nn.Linear(64, 64, bias=False)
    model.lm_head = nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        model.small.weight.mul_(0.01)
    return model


def _tiny_llama():
    """A 2-layer Llama of random weights, small enough to score perplexity in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_2_4_mask_keeps_exactly_two_of_every_four_and_the_largest():
    w = torch.randn(16, 64)
    keep = prune.mask_2_4(w)
    groups, kept = w.abs().reshape(-1, 4), keep.reshape(-1, 4)
    assert keep.dtype == torch.bool and keep.shape == w.shape
    assert torch.all(kept.sum(dim=1) == 2)
    smallest_kept = torch.where(kept, groups, torch.inf).amin(dim=1)
    largest_dropped = torch.where(kept, -torch.inf, groups).amax(dim=1)
    assert torch.all(smallest_kept >= largest_dropped)


def test_2_4_mask_ranks_by_magnitude_not_sign():
    w = torch.tensor([[-9.0, 1.0, 0.5, 3.0, 0.0, -0.1, 0.2, -7.0]])
    assert prune.mask_2_4(w).tolist() == [[True, False, False, True, False, False, True, True]]


def test_2_4_mask_names_a_shape_it_cannot_group():
    with pytest.raises(ValueError, match=r"divide by 4.*\(3, 6\)"):
        prune.mask_2_4(torch.ones(3, 6))


def test_magnitude_mask_prunes_the_exact_count_even_with_tied_values():
    w = torch.randint(-3, 4, (50, 40)).float()  # 7 distinct values: thousands of ties
    for sparsity in (0.0, 0.1, 0.37, 0.5, 0.9):
        keep = prune.magnitude_mask(w, sparsity)
        assert int((~keep).sum()) == round(sparsity * w.numel())
        if 0 < sparsity:
            assert w[~keep].abs().max() <= w[keep].abs().min()


def test_magnitude_mask_of_a_whole_model_is_exact_too():
    # over 2**16 weights the threshold is bracketed from a sample first: the count stays exact
    w = torch.randint(-50, 51, (5_000_000,), generator=torch.Generator().manual_seed(0)).float()
    for sparsity in (0.3, 0.999):
        keep = prune.magnitude_mask(w, sparsity)
        assert int((~keep).sum()) == round(sparsity * w.numel())
        assert w[~keep].abs().max() <= w[keep].abs().min()
    w = torch.ones(5_000_000)
    w[::5_000_000 >> 16] = 0.0  # the strided sample sees only zeros: its bracket misses
    keep = prune.magnitude_mask(w, 0.5)
    assert int((~keep).sum()) == 2_500_000 and bool((w[keep] == 1).all())


def test_bad_sparsity_names_the_value_and_the_range():
    with pytest.raises(ValueError, match=r"\[0, 1\).*1\.5"):
        prune.magnitude_mask(torch.ones(4), 1.5)
    with pytest.raises(ValueError, match="'row'.*layer, global"):
        prune.prune_linears(_two_layer_model(), 0.5, scope="row")


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.7])
def test_per_layer_pruning_gives_every_layer_the_requested_sparsity(sparsity):
    model = _two_layer_model()
    per_layer = prune.prune_linears(model, sparsity, "layer")
    assert set(per_layer) == {"small", "large"}  # lm_head skipped
    assert all(abs(s - sparsity) <= 0.005 for s in per_layer.values()), per_layer
    assert prune.sparsity_of(model.lm_head.weight) == 0.0


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.7])
def test_global_pruning_reaches_the_total_and_takes_more_from_small_weights(sparsity):
    model = _two_layer_model()
    per_layer = prune.prune_linears(model, sparsity, "global")
    assert abs(prune.model_sparsity(model) - sparsity) <= 0.005
    assert per_layer["small"] > per_layer["large"]  # one threshold: small weights go first


def test_only_prunes_the_named_layer_type():
    model = _two_layer_model()
    prune.prune_linears(model, 0.5, only=("large",))
    assert prune.sparsity_of(model.large.weight) == 0.5
    assert prune.sparsity_of(model.small.weight) == 0.0


def test_dense_zeros_save_nothing_and_sparse_formats_pay_for_positions():
    w = torch.randn(64, 128, dtype=torch.float16)
    w = w * prune.mask_2_4(w)
    dense = prune.storage_bytes(w, "dense")
    assert dense == 64 * 128 * 2  # half the weights are zero, and it costs the same
    # CSR: 2-byte value + 4-byte index per nonzero, 8-byte row pointers: 1.5x dense at 50%
    assert prune.storage_bytes(w, "csr") == 4096 * 6 + 8 * 65 > dense
    # 2:4: half the values + 2 bits of position per kept value
    assert prune.storage_bytes(w, "2:4") == 4096 * 2 + 4096 * 2 // 8 == 0.5625 * dense
    with pytest.raises(ValueError, match="'coo'.*dense, csr, 2:4"):
        prune.storage_bytes(w, "coo")


def test_prune_before_quantizing_or_be_told_so():
    model = quant.quantize_linears(_two_layer_model(), "int8-channel")
    with pytest.raises(ValueError, match="already quantized; prune before quantizing"):
        prune.prune_2_4(model)


def test_named_methods_parse_apply_and_name_the_allowed_forms():
    assert prune.parse_method("magnitude-30") == ("layer", 0.3)
    assert prune.parse_method("global-50") == ("global", 0.5)
    assert prune.parse_method("2:4+int8") == ("2:4+int8", 0.5)
    assert prune.parse_method("int8-wo") is None
    with pytest.raises(ValueError, match="'magnitude-x'.*magnitude-<percent>.*2:4\\+int8"):
        prune.apply_method(_two_layer_model(), "magnitude-x")
    model = prune.apply_method(_two_layer_model(), "2:4+int8")
    assert isinstance(model.large, quant.QuantLinear)
    assert prune.model_sparsity(model) == 0.5  # symmetric int8 keeps every zero a zero
    with pytest.raises(ValueError, match="unknown quantization method 'nope'.*2:4"):
        quant_bench.method_of("nope")


def test_sweep_and_sensitivity_leave_the_model_untouched_and_rank_layer_types():
    from labkit.quality import perplexity

    model = _tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = prune.sparsity_sweep(model, ids, [0.0, 0.5], window=32, stride=16, progress=False)
    assert [(r["scope"], r["sparsity"]) for r in rows] == [
        ("layer", 0.0), ("layer", 0.5), ("global", 0.0), ("global", 0.5)]
    assert rows[0]["perplexity"] == pytest.approx(perplexity(model, ids, 32, 16))
    assert rows[1]["measured_sparsity"] == pytest.approx(0.5, abs=0.005)
    assert rows[1]["by_type"]["up_proj"] == pytest.approx(0.5, abs=0.005)  # per layer: even
    scan = prune.sensitivity_scan(model, ids, 0.5, window=32, stride=16, progress=False)
    assert list(scan) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pruning_fields_count_sparse_bytes_and_say_why_speed_is_not_timed():
    model = prune.apply_method(_tiny_llama(), "magnitude-50")
    fields = prune_bench.pruning_fields(model, "magnitude-50")
    assert fields["sparsity"] == pytest.approx(0.5, abs=0.005)
    assert fields["sparse_format"] == "csr, fp16 values"
    assert "stay dense" in fields["matmul_speedup_skipped"]
    model = prune.apply_method(_tiny_llama(), "2:4+int8")
    fields = prune_bench.pruning_fields(model, "2:4+int8")
    weights = sum(m.in_features * m.out_features for m in quant.target_linears(model).values())
    rows = sum(m.out_features for m in quant.target_linears(model).values())
    assert fields["sparse_format_bytes"] == weights // 2 + weights // 2 // 4 + 2 * rows
    if not torch.cuda.is_available():
        assert "no CUDA" in fields["matmul_speedup_skipped"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU skip")
def test_sparse_matmul_timing_is_skipped_with_the_reason_on_cpu():
    rows = prune_bench.semi_structured_speedup([(64, 64)], (1, 16))
    assert [r["tokens"] for r in rows] == [1, 16]
    assert all("NVIDIA GPU" in r["skipped"] for r in rows)


@pytest.mark.slow
def test_perplexity_rises_with_sparsity_on_the_bundled_model():
    from labkit import quality
    from labkit.models import load_model

    model, tok, _ = load_model("smollm2-135m", "cpu", "float32")
    ids = quality.eval_token_ids(tok, 256)
    rows = prune.sparsity_sweep(model, ids, [0.3, 0.5, 0.7], scopes=("layer",), window=256,
                                stride=256, progress=False)
    ppl = [r["perplexity"] for r in rows]
    dense = quality.perplexity(model, ids, 256, 256)
    # measured (2 CPU cores, 256 tokens): dense 22.1, 30% 37.1, 50% 353, 70% 28,458
    assert dense * 1.3 < ppl[0] and ppl[0] * 3 < ppl[1] and ppl[1] * 3 < ppl[2], (dense, ppl)
    two_four = quality.perplexity(prune.apply_method(model, "2:4"), ids, 256, 256)
    assert two_four > 1.5 * ppl[1]  # the 2:4 constraint costs more than free 50%: ~1000 vs 353


@pytest.mark.slow
def test_quant_bench_pruning_rows_follow_the_contract():
    doc = quant_bench.run_quant_bench(
        "smollm2-135m", ["magnitude-50", "2:4"], device="cpu", max_eval_tokens=64, window=64,
        stride=64, decode_tokens=3, b1_requests=1, large_batch=2, agreement_tokens=2,
        progress=False)
    runs = {r["name"]: r for r in doc["runs"]}
    for name in ("magnitude-50", "2:4"):
        run = runs[name]
        for key in ("num_requests", "output_tokens", "weight_bytes", "fp16_weight_bytes",
                    "perplexity", "decode_tokens_per_s_b1", "sparsity", "sparse_format_bytes",
                    "matmul_speedup_skipped"):
            assert key in run, (name, key)
        assert run["sparsity"] == pytest.approx(0.5, abs=0.005)
        # zeros in dense tensors: the bytes held are those of the dense fp32 model
        assert run["weight_bytes"] == 2 * run["fp16_weight_bytes"]
    assert runs["2:4"]["sparse_format_bytes"] == 0.5625 * runs["2:4"]["fp16_weight_bytes"]
    assert runs["magnitude-50"]["sparse_format_bytes"] > runs["2:4"]["fp16_weight_bytes"]
    table = quant_bench.bench_table(doc)
    assert {"sparsity", "sparse_x_fp16", "matmul_speedup"} <= set(table.columns)
