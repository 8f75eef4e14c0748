"""One way to count weight bytes: all a model holds, its quantized linear layers, a checkpoint."""

from __future__ import annotations

import pytest
import torch

from labkit import quant, sizes


def test_weight_bytes_counts_tied_weights_once():
    lin = torch.nn.Linear(10, 20)
    assert sizes.weight_bytes(lin) == (10 * 20 + 20) * 4
    tied = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50, bias=False))
    tied[1].weight = tied[0].weight
    assert sizes.weight_bytes(tied) == 50 * 8 * 4
    assert sizes.weight_bytes(lin.to(torch.bfloat16)) == (10 * 20 + 20) * 2


def test_weight_bytes_counts_quantized_layers_as_stored():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False),
                                torch.nn.Linear(32, 64, bias=False))
    assert sizes.weight_bytes(model) == 2 * 64 * 32 * 4
    quant.quantize_linears(model, "int8-channel", skip=())
    # the codes live in buffers now: 1 byte per weight plus one scale per output row
    assert sizes.weight_bytes(model) == sizes.weight_bytes(model, layers="linear", skip=())
    assert 2 * 64 * 32 < sizes.weight_bytes(model) < 2 * 64 * 32 * 1.1


def test_linear_layers_skip_lm_head_and_biases_and_convert_to_another_dtype():
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(16, 8)  # 128 weights + 8 bias values
    model.lm_head = torch.nn.Linear(8, 100, bias=False)
    assert sizes.weight_bytes(model, layers="linear") == 16 * 8 * 4
    assert sizes.weight_bytes(model, layers="linear", skip=()) == (16 * 8 + 8 * 100) * 4
    assert sizes.weight_bytes(model, layers="linear", as_dtype=torch.float16) == 16 * 8 * 2
    assert sizes.weight_bytes(model) == (16 * 8 + 8 + 8 * 100) * 4


def test_bad_layers_or_options_for_everything_name_the_problem():
    lin = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="unknown layers 'dense'; choose one of: all, linear"):
        sizes.weight_bytes(lin, layers="dense")
    with pytest.raises(ValueError, match="layers='linear' only"):
        sizes.weight_bytes(lin, as_dtype=torch.float16)


def test_checkpoint_bytes_read_shapes_from_the_headers(tmp_path):
    from safetensors.torch import save_file

    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 8),
               "model.embed_tokens.weight": torch.zeros(10, 8)}, tmp_path / "model.safetensors")
    assert sizes.checkpoint_bytes(tmp_path) == 2 * (4 * 8 + 10 * 8)  # bf16, whatever is on disk
    assert sizes.checkpoint_bytes(tmp_path, linear_element_bytes=1) == 4 * 8 + 2 * 10 * 8
