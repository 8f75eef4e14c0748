"""labkit's own serving overhead: the same vLLM engine on the same requests, offline and behind
``labkit serve``, as a ratio of output tokens/s (goal: served / in-process >= 0.9).

    python results/frontend_overhead.py OUT.json [--model synthetic-1b] [--num-requests 512]

Workload: ``make_workload(N)`` (chat prompts from ``data/prompts.jsonl``, greedy, ``ignore_eos``),
``--output-tokens`` each (default 128). Three measurements, each after its own warm-up:
- ``offline``: one process, ``engine.generate(all N)`` (vLLM schedules up to ``max_num_seqs``
  = 256 at once): the engine's best case, no client at all;
- ``in_process[C]``: the same engine, C threads each sending one request at a time
  (closed loop, no HTTP): the concurrency a C-client load test allows;
- ``served[C]``: ``labkit serve --engine vllm --no-cache --max-batch-size 256`` in a second
  process, ``labkit.bench.serve.run_serve_bench`` with C closed-loop streaming clients
  (its ``client_bound`` flag says whether the load generator, not the server, was the limit).
The ratio ``served / in_process`` at equal C is the front end's cost (HTTP, SSE, the service);
``served / offline`` adds the cost of a closed loop of C clients. ``--engine-process`` adds
``served[C]_engine_process``: the same server with ``--engine-process`` (the engine in a process
of its own, ``labkit.engines.ProcessEngine``), which takes the front end off the engine's GIL.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request


def _in_process(engine: str, model: str, n: int, tokens: int, concurrencies: list[int]) -> dict:
    from labkit.bench.workloads import make_workload
    from labkit.engines import get_engine

    reqs = make_workload(n, min_output_tokens=tokens, max_output_tokens=tokens)
    out: dict = {}
    kwargs = {"max_num_seqs": 256} if engine == "vllm" else {}
    with get_engine(engine, model=model, **kwargs) as eng:
        eng.warmup()
        eng.generate(reqs[:16])
        t0 = time.perf_counter()
        done = eng.generate(reqs)
        wall = time.perf_counter() - t0
        out["offline"] = {"output_tokens_per_s": sum(c.output_tokens for c in done) / wall,
                          "duration_s": wall}
        for c in concurrencies:
            todo: queue.Queue = queue.Queue()
            for r in reqs:
                todo.put(r)
            counted: list[int] = []

            def client(todo: queue.Queue = todo, counted: list[int] = counted) -> None:
                while True:
                    try:
                        r = todo.get_nowait()
                    except queue.Empty:
                        return
                    counted.append(eng.generate([r])[0].output_tokens)

            threads = [threading.Thread(target=client) for _ in range(c)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            out[f"in_process_{c}"] = {"output_tokens_per_s": sum(counted) / wall,
                                      "duration_s": wall}
    return out


def _served(engine: str, model: str, n: int, tokens: int, concurrencies: list[int],
            port: int, switch_interval_ms: float | None = None,
            engine_process: bool = False) -> dict:
    from labkit.bench.serve import run_serve_bench

    argv = ["serve", "--engine", engine, "--model", model, "--no-cache", "--port", str(port),
            "--max-batch-size", "256"] + (["--engine-process"] if engine_process else [])
    # switch_interval_ms: the server's sys.setswitchinterval (Python's default is 5 ms): how long
    # the event loop's thread may hold the GIL while the engine's step thread waits for it
    code = (f"import sys; sys.setswitchinterval({switch_interval_ms / 1e3!r}); "
            if switch_interval_ms else "") + f"from labkit.cli import main; main({argv!r})"
    server = subprocess.Popen([sys.executable, "-c", code],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        doc = run_serve_bench(url, concurrencies=concurrencies, num_requests=n, model=model,
                              min_output_tokens=tokens, max_output_tokens=tokens,
                              client_ceiling=True, warmup=16)
    finally:
        server.terminate()
        server.wait(60)
    return {f"served_{r['concurrency']}": {k: r.get(k) for k in (
        "output_tokens_per_s", "duration_s", "ttft_s", "tpot_s", "client_bound",
        "client_ceiling_fraction", "failed")} for r in doc["runs"]} | {
        "client_ceiling": doc.get("client_ceiling")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--engine", default="vllm", help="vllm (hf-cb: a CPU smoke test)")
    ap.add_argument("--model", default="synthetic-1b")
    ap.add_argument("--num-requests", type=int, default=512)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--concurrencies", default="64,256")
    ap.add_argument("--port", type=int, default=8013)
    ap.add_argument("--part", choices=["all", "in-process"], default="all")
    ap.add_argument("--switch-intervals-ms", default="",
                    help="also serve with these GIL switch intervals (e.g. 0.5), one server each")
    ap.add_argument("--engine-process", action="store_true",
                    help="also serve with the engine in a process of its own")
    a = ap.parse_args()
    cs = [int(c) for c in a.concurrencies.split(",")]
    if a.part == "in-process":  # the child: one process whose GPU memory is freed at exit
        with open(a.out, "w") as f:
            json.dump(_in_process(a.engine, a.model, a.num_requests, a.output_tokens, cs), f)
        return
    from labkit.device import device_name

    part = a.out + ".in_process.json"
    subprocess.run([sys.executable, __file__, part, "--part", "in-process", "--engine", a.engine,
                    "--model", a.model, "--num-requests", str(a.num_requests),
                    "--output-tokens", str(a.output_tokens), "--concurrencies", a.concurrencies],
                   env=os.environ, check=True)
    doc = {"bench": "frontend_overhead", "device": device_name(), "engine": a.engine,
           "model": a.model, "num_requests": a.num_requests, "output_tokens": a.output_tokens,
           **json.load(open(part))}
    os.remove(part)
    doc |= _served(a.engine, a.model, a.num_requests, a.output_tokens, cs, a.port)
    variants = [""]
    for ms in filter(None, a.switch_intervals_ms.split(",")):
        tag = f"_switch_{ms}ms"
        variants.append(tag)
        doc |= {k + tag: v for k, v in _served(a.engine, a.model, a.num_requests,
                                               a.output_tokens, cs, a.port, float(ms)).items()}
    if a.engine_process:
        variants.append("_engine_process")
        doc |= {k + "_engine_process": v for k, v in _served(
            a.engine, a.model, a.num_requests, a.output_tokens, cs, a.port,
            engine_process=True).items()}
    for c in cs:
        for tag in variants:
            served = doc[f"served_{c}{tag}"]["output_tokens_per_s"]
            doc[f"ratio_served_to_in_process_{c}{tag}"] = served / doc[f"in_process_{c}"][
                "output_tokens_per_s"]
            doc[f"ratio_served_to_offline_{c}{tag}"] = served / doc["offline"][
                "output_tokens_per_s"]
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=2)
    print(json.dumps({k: v for k, v in doc.items() if k.startswith("ratio")}))


if __name__ == "__main__":
    main()
