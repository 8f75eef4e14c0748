"""2:4 semi-structured sparse vs dense matmul at a model's layer shapes.

    python results/prune_speed.py results/H200/prune_2_4_matmul.json
    python results/prune_speed.py results/H200/prune_2_4_matmul_int8.json --dtype int8
    python results/prune_speed.py results/H200/prune_2_4_matmul_smollm2-135m.json --shapes smollm2

Writes one JSON object: device, torch version, which sparse backend ran, and one row per
(layer, tokens) from ``labkit.bench.prune.semi_structured_speedup`` (median ms of 50
synchronized calls after 5 warm-up calls; bf16, or int8 2:4 against bf16 dense with
``--dtype int8``). ``--shapes``: the synthetic-8b (Llama-3-8B) layers or the bundled SmolLM2-135M
ones. On a machine without a suitable GPU every row says why it skipped.
"""

import argparse
from datetime import UTC, datetime
from pathlib import Path

import torch

from labkit import __version__
from labkit.bench.prune import DTYPES, semi_structured_speedup
from labkit.device import device_name
from labkit.metrics import json_text

SHAPES = {
    "8b": {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (1024, 4096),
           "gate_proj/up_proj": (14336, 4096), "down_proj": (4096, 14336)},
    "smollm2": {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (192, 576),
                "gate_proj/up_proj": (1536, 576), "down_proj": (576, 1536)},
}
TOKENS = (1, 16, 256, 4096, 16384)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("out", nargs="?", type=Path, help="JSON file to write (default: stdout only)")
parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
parser.add_argument("--shapes", default="8b", choices=sorted(SHAPES))
args = parser.parse_args()
layers = SHAPES[args.shapes]
rows = semi_structured_speedup(list(layers.values()), TOKENS, dtype=args.dtype)
names = {tuple(v): k for k, v in layers.items()}
for row in rows:
    row["layer"] = names[tuple(row["shape"])]
cusparselt = getattr(torch.backends, "cusparselt", None)
sparse = "int8 (int8 output, no scales)" if args.dtype == "int8" else args.dtype
dense = "bf16" if args.dtype == "int8" else args.dtype
doc = {"bench": "prune-matmul", "device": device_name(), "torch": torch.__version__,
       "labkit_version": __version__, "created": datetime.now(UTC).isoformat(),
       "cusparselt": bool(cusparselt and cusparselt.is_available()),
       "cusparselt_version": cusparselt.version() if cusparselt and cusparselt.is_available()
       else None,
       "shapes": args.shapes,
       "workload": f"y = x @ W.T, W (out, in) 2:4-pruned random, x (tokens, in) random; "
                   f"sparse side {sparse}, dense side {dense}",
       "metric": "median wall ms of 50 calls after 5 warm-up, each synchronized; *_ms replayed "
                 "from a CUDA graph, *_eager_ms called from Python",
       "runs": rows}
text = json_text(doc)
if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
print(text)
