"""2:4 semi-structured sparse vs dense matmul at the synthetic-8b (Llama-3-8B) layer shapes.

    python results/prune_speed.py results/H200/prune_2_4_matmul.json

Writes one JSON object: device, torch version, which sparse backend ran, and one row per
(layer, tokens) from ``labkit.prune.semi_structured_speedup`` (median ms of 50 synchronized calls
after 5 warm-up calls, bf16). On a machine without a suitable GPU every row says why it skipped.
"""

import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from labkit import __version__
from labkit.device import device_name
from labkit.metrics import json_text
from labkit.prune import semi_structured_speedup

LAYERS = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (1024, 4096),
          "gate_proj/up_proj": (14336, 4096), "down_proj": (4096, 14336)}
TOKENS = (1, 16, 256, 4096, 16384)

rows = semi_structured_speedup(list(LAYERS.values()), TOKENS)
names = {tuple(v): k for k, v in LAYERS.items()}
for row in rows:
    row["layer"] = names[tuple(row["shape"])]
cusparselt = getattr(torch.backends, "cusparselt", None)
doc = {"bench": "prune-matmul", "device": device_name(), "torch": torch.__version__,
       "labkit_version": __version__, "created": datetime.now(UTC).isoformat(),
       "cusparselt": bool(cusparselt and cusparselt.is_available()),
       "cusparselt_version": cusparselt.version() if cusparselt and cusparselt.is_available()
       else None,
       "workload": "y = x @ W.T, W (out, in) 2:4-pruned random bf16, x (tokens, in) random bf16",
       "metric": "median wall ms of 50 calls after 5 warm-up, each synchronized; *_ms replayed "
                 "from a CUDA graph, *_eager_ms called from Python",
       "runs": rows}
out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
text = json_text(doc)
if out:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
print(text)
