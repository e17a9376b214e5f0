"""Latency of ``tools/serve.py`` under concurrent clients, for ``bench_serving.py`` (part c of its table).

One server process on 127.0.0.1 (a free port) serves N tasks: random-weight adapters saved beside a random-weight
base folder (timm local-dir). ``clients`` threads send ``POST /predict`` requests of randomly drawn tasks (one
224 px PNG of noise, the same for all) until ``requests`` answers have come back or ``seconds`` have passed; the
first round of each client is a warm-up and is not counted. The server prints each forward pass
(``--log-batches``), so the result also says how many requests a batch held and how many batches mixed tasks.
The server's whole process group is stopped at the end, whatever happened.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START_SECONDS = 300


def measure_latency(model, base, name: str, args) -> dict:
    """p50 / p99 latency (ms) and throughput of the server for ``model``'s adapters on ``base``'s weights."""
    from visionlora.lora import list_adapters, save_adapter
    from visionlora.models.backbone import save_backbone
    from visionlora.serve.batch_log import read_batch_log
    from visionlora.serve.process import free_port, stop_group, wait_until_healthy

    with tempfile.TemporaryDirectory(prefix="bench_serving_") as scratch:
        folder = Path(scratch)
        save_backbone(base, folder / "base")
        save_adapter(model, folder / "adapters")
        tasks = list_adapters(model)
        command = [sys.executable, str(ROOT / "tools" / "serve.py"), "--base-weights", f"local-dir:{folder / 'base'}",
                   *[f"--task={task}={folder / 'adapters' / task}" for task in tasks], "--port", str(free_port()),
                   "--accelerator", "cpu", "--max-batch-size", str(args.batch_size), "--log-batches"]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads or os.cpu_count()), HF_HUB_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        log = folder / "server.log"
        with open(log, "w") as output:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        try:
            url = f"http://127.0.0.1:{command[command.index('--port') + 1]}"
            wait_until_healthy(url, process, log, START_SECONDS)
            found = run_clients(url, tasks, args)
        finally:
            stop_group(process)
        found |= batch_sizes(read_batch_log(log.read_text()))
    return {"model": name, "tasks": len(tasks), "clients": args.clients} | found


def run_clients(url: str, tasks: list[str], args) -> dict:
    body = [json.dumps({"task": task, "image": noise_png()}).encode() for task in tasks]
    latencies, failures, lock = [], [], threading.Lock()
    deadline = time.monotonic() + args.latency_seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for round_ in range(args.latency_requests):
            with lock:
                if len(latencies) >= args.latency_requests or time.monotonic() > deadline:
                    return
            started = time.perf_counter()
            status = post(f"{url}/predict", body[rng.randrange(len(body))])
            elapsed = time.perf_counter() - started
            with lock:
                if status != 200:
                    failures.append(status)
                elif round_:  # the first round warms up the server
                    latencies.append(elapsed)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(args.clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if failures or not latencies:
        raise RuntimeError(f"serving benchmark: {len(failures)} failed requests (statuses {sorted(set(failures))}), "
                           f"{len(latencies)} answered")
    ordered = sorted(latencies)
    return {"answered": len(ordered), "p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
            "requests_per_s": len(ordered) / wall}


def batch_sizes(batches: list[dict[str, int]]) -> dict:
    """Mean requests per forward pass and the share of passes that mixed tasks."""
    sizes = [sum(batch.values()) for batch in batches]
    mixed = sum(len(batch) > 1 for batch in batches)
    return {"mean_batch": statistics.mean(sizes) if sizes else 0.0, "mixed_batches": mixed / max(len(sizes), 1)}


def noise_png(size: int = 224) -> str:
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def post(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
