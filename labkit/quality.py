"""Did quantization hurt the model? Perplexity on held-out text, and agreement with a reference.

- ``perplexity``: ``exp(mean negative log-likelihood per token)`` of a text, in nats before the
  exp. Long texts are scored in windows of ``window`` tokens that advance by ``stride``; each
  token is scored once, with up to ``window - stride`` tokens of earlier context (the first token
  of the text has no context and is not scored). Log-probabilities are computed from the
  model's logits in float64 and summed in float64. A model that spreads its probability evenly
  over V tokens has perplexity exactly V; lower is better.
- ``greedy_outputs`` / ``agreement``: the greedy tokens a model produces for some prompts, and how
  many prompts give exactly the reference model's tokens (plus the mean length of the matching
  prefix, in tokens): a stricter check than perplexity, since one flipped near-tie changes every
  token after it.

The evaluation text is ``data/eval_text.txt`` (written for this project; see data/SOURCES.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from labkit.config import DATA_DIR

EVAL_TEXT = DATA_DIR / "eval_text.txt"
DEFAULT_WINDOW = 512
DEFAULT_STRIDE = 256
AGREEMENT_PROMPTS = (
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Why is the sky blue?",
    "Write one sentence about the sea.",
    "What do bees make?",
    "How many days are in a week?",
    "Give a synonym for 'happy'.",
    "What is two plus three?",
)


def eval_text(path: str | Path | None = None) -> str:
    """The evaluation text (default: ``data/eval_text.txt``)."""
    path = Path(path) if path is not None else EVAL_TEXT
    if not path.exists():
        raise FileNotFoundError(f"evaluation text not found at {path}; pass path= to a text file")
    return path.read_text(encoding="utf-8")


def eval_token_ids(tokenizer, max_tokens: int | None = None, path: str | Path | None = None
                   ) -> list[int]:
    """Token ids of the evaluation text, cut to the first ``max_tokens`` (None: all)."""
    ids = tokenizer(eval_text(path), add_special_tokens=False)["input_ids"]
    return ids[:max_tokens] if max_tokens is not None else ids


def perplexity(model, token_ids: Sequence[int], window: int = DEFAULT_WINDOW,
               stride: int = DEFAULT_STRIDE, device=None) -> float:
    """Perplexity of ``model`` on ``token_ids`` (see module doc). ``model(input_ids)`` must return
    an object with ``.logits`` of shape ``[1, T, V]`` (any transformers causal LM does)."""
    import torch

    if window < 2 or not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {ids.numel()}")
    if device is None:
        param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = param.device if param is not None else "cpu"
    nll_sum, scored = 0.0, 0
    scored_upto = 1  # tokens [0, scored_upto) are already accounted for (token 0: no context)
    with torch.inference_mode():
        while scored_upto < ids.numel():
            # a window of n tokens makes n - 1 predictions, so at most window - 1 are new
            end = min(scored_upto + min(stride, window - 1), ids.numel())
            begin = max(0, end - window)
            chunk = ids[begin:end].unsqueeze(0).to(device)
            new = end - scored_upto  # only the last `new` predictions are newly scored
            logits = model(chunk).logits[0, -new - 1:-1].double()  # predict chunk[-new:]
            targets = chunk[0, -new:].unsqueeze(-1)
            token_nll = torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets).squeeze(-1)
            nll_sum += float(token_nll.sum())
            scored += new
            scored_upto = end
    return math.exp(nll_sum / scored)


def greedy_outputs(model, tokenizer, prompts: Sequence[str] = AGREEMENT_PROMPTS,
                   max_new_tokens: int = 16, chat: bool = True) -> list[list[int]]:
    """Greedy output token ids for each prompt, ``max_new_tokens`` each (EOS ignored), batched
    with left padding. Compare only outputs made with the same prompts and batch shape."""
    import torch

    if chat:
        prompt_ids = [list(tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
            return_dict=False)) for p in prompts]
    else:
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompt_ids}, padding=True, return_tensors="pt")
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id)
    return out[:, batch["input_ids"].shape[1]:].tolist()


def agreement(reference: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]
              ) -> dict[str, float]:
    """``exact``: fraction of prompts whose output tokens equal the reference's exactly;
    ``mean_prefix_tokens``: mean number of leading tokens that match."""
    if len(reference) != len(outputs) or not reference:
        raise ValueError(f"need the same non-zero number of outputs, got {len(reference)} "
                         f"reference and {len(outputs)} outputs")
    exact, prefix = 0, 0
    for ref, out in zip(reference, outputs):
        exact += list(ref) == list(out)
        n = 0
        for a, b in zip(ref, out):
            if a != b:
                break
            n += 1
        prefix += n
    return {"exact": exact / len(reference), "mean_prefix_tokens": prefix / len(reference)}
