"""Models without a hub, and the two commands the README promises: doctor and generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import models
from labkit.engines import Request, get_engine

TINY = ('synthetic:{"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,'
        '"num_attention_heads":4,"num_key_value_heads":2}')
LABKIT = [sys.executable, "-m", "labkit.cli"]


def test_bundled_model_is_converted_once_and_reused():
    first = models.bundled_path()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert models.bundled_path() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_synthetic_model_has_the_asked_shape_and_runs():
    ref = models.resolve(TINY)
    config = json.loads((Path(ref.path) / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (64, 2)
    assert config["vocab_size"] == 49152  # the bundled tokenizer's vocabulary
    engine = get_engine("hf", model=TINY)
    [c] = engine.generate([Request(prompt="hello", max_tokens=6, ignore_eos=True)])
    assert c.output_tokens == 6


def test_named_synthetic_shapes_match_real_models():
    cfg = models.synthetic_config("synthetic-8b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads,
            cfg.intermediate_size) == (4096, 32, 8, 14336)


def test_bad_synthetic_config_names_the_problem():
    with pytest.raises(ValueError, match="bad synthetic config"):
        models.resolve("synthetic:{not json")


def test_hf_id_without_network_says_how_to_get_it():
    with pytest.raises(models.ModelNotFoundError, match="huggingface-cli download"):
        models.load_model("no-such-org/no-such-model")


def _run(args, timeout=180):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(LABKIT + args, capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.slow
def test_cli_generate_answers_paris_with_timings():
    done = _run(["generate", "What is the capital of France?", "--max-tokens", "24",
                 "--engine", "hf"])
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "TTFT" in done.stdout and "tokens/s" in done.stdout


@pytest.mark.slow  # doctor starts an embedded redis-server to ping it
def test_cli_doctor_json_has_the_facts():
    done = _run(["doctor", "--json"])
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    for key in ("python", "torch", "transformers", "vllm", "device", "gpu_name",
                "hbm_bytes_per_s", "peak_bf16_flops_per_s", "redis", "models"):
        assert key in facts
    assert facts["device"] == "cpu" and facts["vllm"] is None
    assert facts["models"]["bundled_converted"] is True
    assert facts["redis"]["mode"] in ("embedded", "url")


def test_cli_bad_engine_exits_nonzero_with_choices():
    done = _run(["generate", "hi", "--engine", "vlm"])
    assert done.returncode != 0
    assert "invalid choice: 'vlm'" in done.stderr


@pytest.mark.parametrize("argv, message", [
    (["serve", "--port", "99999"], "argument --port: must be <= 65535, got 99999"),
    (["serve", "--deadline-s", "0"], "argument --deadline-s: must be > 0, got 0"),
    (["serve", "--max-body-bytes", "0"], "argument --max-body-bytes: must be >= 1, got 0"),
    (["bench", "cache", "--num-requests", "0"], "argument --num-requests: must be >= 1, got 0"),
    (["run", "--cell-timeout", "-1"], "argument --cell-timeout: must be > 0, got -1"),
    (["generate", "hi", "--max-tokens", "many"],
     "argument --max-tokens: expected an integer, got 'many'"),
])
def test_cli_bad_numbers_are_refused_before_anything_runs(argv, message, capsys):
    from labkit.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["run", "no_such_lab.ipynb"], "labkit run: error: notebook 'no_such_lab.ipynb' not found"),
    (["bench", "serve", "--url", "http://127.0.0.1:9"],
     "labkit bench: error: cannot reach an OpenAI-compatible server at 'http://127.0.0.1:9'"),
    (["bench", "serve", "--url", "http://x", "--request-rates", "0"],
     "labkit bench: error: request rate '0' must be > 0 requests/s"),
])
def test_cli_missing_inputs_are_one_line_errors_not_tracebacks(argv, message, capsys):
    from labkit.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_eos_ids_come_from_the_generation_config_like_generate(hf_engine):
    """vLLM's engine stops on the ids the hf engine stops on (generation_config.json)."""
    ref = models.resolve("smollm2-135m")
    tokenizer = models.load_tokenizer(ref)
    assert models.eos_token_ids(ref, tokenizer) == hf_engine.eos_ids
    assert tokenizer.eos_token_id in hf_engine.eos_ids


def test_cli_defaults_come_from_the_environment_and_flags_win(monkeypatch):
    from labkit.cli import _resolve_defaults, build_parser

    def parsed(*argv):
        args = build_parser().parse_args(list(argv))
        _resolve_defaults(args)
        return args

    monkeypatch.setenv("LABKIT_MODEL", "synthetic-1b")
    monkeypatch.setenv("LABKIT_ENGINE", "hf-cb")
    monkeypatch.setenv("LABKIT_PROFILE", "full")
    assert (parsed("generate", "hi").model, parsed("generate", "hi").engine) == \
        ("synthetic-1b", "hf-cb")
    assert parsed("generate", "hi", "--model", "smollm2-135m", "--engine", "hf").model \
        == "smollm2-135m"
    assert parsed("bench", "serve", "--url", "http://x").model is None  # asks the server
    assert parsed("run").profile == "full" and parsed("run", "--profile", "ci").profile == "ci"
    monkeypatch.delenv("LABKIT_MODEL")
    monkeypatch.delenv("LABKIT_PROFILE")
    assert parsed("serve").model == "smollm2-135m" and parsed("run").profile == "ci"  # no GPU


@pytest.mark.parametrize("ray", [False, True])
def test_serve_flags_reach_the_server(ray, monkeypatch):
    """--deadline-s and --max-body-bytes reach ``serve`` and ``serve_ray`` (``none``: no
    deadline), so an operator can set the 504 and 413 limits without writing Python."""
    import labkit.serving.deploy
    import labkit.serving.http
    from labkit.cli import main
    from labkit.serving.openai_api import MAX_BODY_BYTES
    from labkit.serving.service import DEADLINE_S

    seen = []
    target = (labkit.serving.deploy, "serve_ray") if ray else (labkit.serving.http, "serve")
    monkeypatch.setattr(*target, lambda **kw: seen.append(kw))
    flags = ["serve", "--engine", "hf"] + (["--ray"] if ray else [])
    assert main(flags) == 0
    assert main([*flags, "--deadline-s", "none", "--max-body-bytes", "4096"]) == 0
    assert main([*flags, "--deadline-s", "2.5"]) == 0
    assert [(kw["deadline_s"], kw["max_body_bytes"]) for kw in seen] == [
        (DEADLINE_S, MAX_BODY_BYTES), (None, 4096), (2.5, MAX_BODY_BYTES)]
    if not ray:
        assert main([*flags, "--engine-process"]) == 0
        assert [kw["engine_process"] for kw in seen] == [False, False, False, True]


def test_engine_process_with_ray_is_refused(capsys):
    from labkit.cli import main

    assert main(["serve", "--ray", "--engine-process"]) == 2
    assert "--engine-process is for the one-process server" in capsys.readouterr().err
