"""Load and benchmark tools: what the labs and ``labkit bench`` measure with.

| module      | what                                                                       |
|-------------|----------------------------------------------------------------------------|
| workloads   | requests built from data/prompts.jsonl (lengths, distinct prompts)         |
| loadgen     | closed- and open-loop load over any ``send(request)`` coroutine            |
| client      | the OpenAI-compatible HTTP client: streaming, per-chunk time stamps        |
| slo         | SLO text and the MLPerf presets, the knee of a rate sweep, cost fields     |
| fake_server | an OpenAI-compatible server of known timing (tests, lab 05's queueing)     |
| ceiling     | the load generator's own ceiling; which runs are client-bound              |
| sweep       | rate and batch-size sweeps for lab 05; the reference service on its loop   |
| latency     | ``bench latency``: one request at a time, roofline fields, decode sweep    |
| batching    | ``bench batching`` and lab 02's plan: sizes, workloads, the bench document |
| batch_runs  | static sweep and static/dynamic/continuous at equal work, in rounds       |
| caching     | ``bench cache``: miss and hit paths, hit ratio of a workload with repeats  |
| quant       | ``bench quant``: size, perplexity and decode speed per quantization method |
| prune       | 2:4 sparse vs dense matmul timing; the pruning rows' fields of bench quant  |
| serve       | ``bench serve``: closed or open loop against a server, SLO, knee, cost     |
| compare     | the course's reference service measured: its defects, against the fix      |
| autoscale   | a load step against a Ray Serve deployment and its replica counts          |
| capstone    | lab 07's workload, trials, min/median/max, speed-ups and the quality gate   |
| app_profile | lab 07's profiler: where an app's time goes, loop stalls, engine requests   |
| ledger      | lab 07's optimization ledger: steps, decisions, markdown, the record        |
| capstone_grade | the grader's own measurement of a capstone: final speed-up, ledger check |

Every bench writes the JSON contract of ``labkit.metrics`` (``bench_document``).
"""
