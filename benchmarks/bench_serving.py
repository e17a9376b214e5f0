"""Serving N classifier tasks: one backbone with N adapters against N merged models (memory and throughput).

For each model (random weights, ``pretrained=False``, 224 px), rank (``--ranks``) and N tasks (LoRA with random
factors, ``init='small-random'``, timm's default targets: attention for ViTs, every conv for ConvNets; a 10-class
head each):

* memory: bytes of the parameters and buffers (each storage once) of one backbone with N adapters and heads,
  against N merged models (N x one plain model: a merged model has exactly the plain model's tensors); and the
  resident memory (RSS) that building each adds in a fresh process (Linux), over the RSS after the imports. The
  byte count is exact; RSS adds allocator slack.
* throughput (images/s) of one stream of requests whose tasks are drawn at random, taken in arrivals of
  ``--batch-size``: ``mixed`` runs each arrival as one mixed-task batch (``adapter_batch``); ``switch`` groups it by
  task and runs each group after ``set_adapter``; ``merged/task`` runs each group on that task's own model (N copies
  of the plain model, which cost what merged models cost); ``merged x1`` is the reference: one merged model on
  full batches of one task. The median over ``--batches`` timed arrivals (after one warm-up; the variants take
  turns on each arrival) gives images/s. Each (model, rank, N) cell runs in a fresh process (``--in-process``:
  all in this one).
* latency (``serving_latency.py``): p50 / p99 of ``tools/serve.py`` under ``--clients`` concurrent clients, for the
  largest N at the first rank.

Targets (ratios of medians of one run): memory of 16 tasks <= 1.25 x one model; mixed throughput at the batch size
>= 0.8 x one merged model's (also given paired: per arrival, the reference's time over mixed's, side by side).
LoRA layers run in the library's default form (``--form auto``: convs in the weight form, Linears in the activation
form, at inference). A mixed batch of several tasks adds each sample's low-rank branch to one base op per layer in
either form; a batch of one task runs a weight-form conv as that adapter alone, one conv with W + ΔW. Prints a
table and writes ``benchmarks/results/serving.json``.

    python benchmarks/bench_serving.py
    python benchmarks/bench_serving.py --models resnet50 --tasks 1 16 --batches 3
    python benchmarks/bench_serving.py --lora-fa --no-latency --out benchmarks/results/serving_lora_fa.json

``--lora-fa``: the tasks are LoRA-FA adapters (``LoraConfig.freeze_A``: A a seeded frozen projection, only B
trained), which hold one A per layer for all tasks (``visionlora/lora/frozen_a.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_MEMORY, TARGET_THROUGHPUT = 1.25, 0.8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "resnet50"])
    parser.add_argument("--tasks", nargs="+", type=int, default=[1, 4, 16], help="numbers of tasks N")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=8, help="timed arrivals per variant (after one warm-up)")
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 4], help="LoRA ranks (a set of rows each)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the latency part")
    parser.add_argument("--latency-requests", type=int, default=64, help="answers to time (after warm-up)")
    parser.add_argument("--latency-seconds", type=float, default=240, help="time limit of the latency part")
    parser.add_argument("--no-latency", action="store_true", help="skip part (c), the server's latency")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--form", default="auto", choices=["auto", "activation", "weight"],
                        help="how LoRA layers apply their update (LoraConfig.form)")
    parser.add_argument("--lora-fa", action="store_true",
                        help="LoRA-FA tasks (freeze_A: one seeded A shared by every task, only B per task)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--in-process", action="store_true",
                        help="measure every cell in this process (default: each (model, rank, N) in a fresh one)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving.json"))
    return parser.parse_args(argv)


def tensor_bytes(model) -> int:
    """Bytes of every parameter and buffer, each storage counted once."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def multi_task_model(base, count: int, rank: int, args, copy_base: bool = True):
    """``count`` adapters t0, t1, ... with their own heads on a copy of ``base`` (on ``base`` itself with
    ``copy_base=False``)."""
    from visionlora.lora import LoraConfig, add_adapter
    from visionlora.models.families import default_lora_targets

    model = copy.deepcopy(base) if copy_base else base
    config = LoraConfig(r=rank, alpha=rank, targets=default_lora_targets(base), init="small-random",
                        form=args.form, freeze_A=args.lora_fa)
    for index in range(count):
        add_adapter(model, f"t{index}", config, num_classes=args.classes)
    return model.eval()


def resident_mb(what: str, name: str, count: int, rank: int, args) -> float:
    """Resident memory (MB) that building ``what`` adds in a fresh process: ``adapters`` (one backbone with
    ``count`` adapters and heads) or ``merged`` (``count`` plain models): RSS after building minus RSS after the
    imports. glibc's mmap threshold is pinned at 128 KiB so that every tensor buffer is its own mapping, freed to
    the OS when freed: with the default dynamic threshold, temporaries freed while building stay resident and
    the growth measures the allocator's history rather than what is kept."""
    command = [sys.executable, __file__, "--rss-worker", what, name, str(count), str(rank), str(args.classes),
               str(int(args.lora_fa))]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return float(done.stdout.strip().splitlines()[-1])


def rss_worker(what: str, name: str, count: str, rank: str, classes: str, lora_fa: str) -> None:
    import gc

    import timm

    import visionlora.lora  # noqa: F401  (imported before the baseline, as the model building needs it)

    def rss() -> float:
        gc.collect()
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    before = rss()
    base = timm.create_model(name, pretrained=False, num_classes=int(classes))
    if what == "adapters":
        settings = argparse.Namespace(classes=int(classes), form="activation", lora_fa=lora_fa == "1")
        kept = multi_task_model(base, int(count), int(rank), settings, copy_base=False)
    else:
        kept = [base] + [copy.deepcopy(base) for _ in range(int(count) - 1)]
    print(rss() - before, flush=True)
    del kept


def arrivals(count: int, args, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    return [[f"t{rng.randrange(count)}" for _ in range(args.batch_size)] for _ in range(args.batches + 1)]


def groups(names: list[str]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for position, name in enumerate(names):
        found.setdefault(name, []).append(position)
    return found


def timed_arrivals(variants: dict, stream: list[list[str]], x) -> dict[str, list[float]]:
    """Per variant, the seconds of each timed arrival (the first arrival is a warm-up); the variants take turns
    on each arrival, in rotating order, so drift of a shared machine hits them alike."""
    import torch

    seconds = {key: [] for key in variants}
    keys = list(variants)
    with torch.no_grad():
        for index, names in enumerate(stream):
            for key in keys[index % len(keys):] + keys[: index % len(keys)]:
                started = time.perf_counter()
                variants[key](names, x)
                if index:
                    seconds[key].append(time.perf_counter() - started)
    return seconds


def measure(name: str, count: int, rank: int, args) -> tuple[dict, dict | None]:
    """Part (a) and (b) for N = ``count`` tasks at ``rank``; part (c) too for the largest N at the first rank."""
    import timm
    import torch

    from visionlora.lora import adapter_batch, set_adapter

    torch.manual_seed(0)
    base = timm.create_model(name, pretrained=False, num_classes=args.classes).eval()
    model = multi_task_model(base, count, rank, args)
    merged = [copy.deepcopy(base) for _ in range(count)]
    x = torch.randn(args.batch_size, 3, 224, 224)
    stream = arrivals(count, args)

    def mixed(names, x):
        with adapter_batch(model, names):
            model(x)

    def switch(names, x):
        for task, rows in groups(names).items():
            set_adapter(model, task)
            model(x[rows])

    def per_task(names, x):
        for task, rows in groups(names).items():
            merged[int(task[1:])](x[rows])

    one = tensor_bytes(base)
    row = {"model": name, "adapter": "LoRA-FA" if args.lora_fa else "LoRA", "rank": rank, "tasks": count,
           "batch_size": args.batch_size,
           "one_model_MB": one / 2**20, "adapters_MB": tensor_bytes(model) / 2**20, "merged_MB": count * one / 2**20}
    if sys.platform == "linux":
        row |= {"one_model_RSS_MB": resident_mb("merged", name, 1, rank, args),
                "adapters_RSS_MB": resident_mb("adapters", name, count, rank, args),
                "merged_RSS_MB": resident_mb("merged", name, count, rank, args)}
        row["memory_ratio_RSS"] = row["adapters_RSS_MB"] / row["one_model_RSS_MB"]
    variants = {"reference_ips": lambda names, x: base(x), "mixed_ips": mixed, "switch_ips": switch,
                "merged_per_task_ips": per_task}
    seconds = timed_arrivals(variants, stream, x)
    row |= {key: args.batch_size / statistics.median(times) for key, times in seconds.items()}
    row["memory_ratio"] = row["adapters_MB"] / row["one_model_MB"]
    row["mixed_vs_merged"] = row["mixed_ips"] / row["reference_ips"]  # the ratio of medians (the target's)
    # The same, paired: per arrival, the reference's time over mixed's, run side by side; the median of those.
    row["mixed_vs_merged_paired"] = statistics.median(
        ref / mixed for ref, mixed in zip(seconds["reference_ips"], seconds["mixed_ips"], strict=True))
    latency = None
    if not args.no_latency and count == max(args.tasks) and rank == args.ranks[0]:
        from serving_latency import measure_latency

        del merged  # the server is another process: free the copies first
        latency = measure_latency(model, base, name, args) | {"rank": rank}
    return row, latency


def measure_cell(name: str, count: int, rank: int, args) -> tuple[dict, dict | None]:
    """:func:`measure` in a fresh process (unless ``--in-process``): each cell starts from the same allocator and
    thread-pool state, so one cell's leftovers (freed models, cached kernels) do not tilt the next one's timing."""
    if args.in_process:
        return measure(name, count, rank, args)
    command = [sys.executable, __file__, "--cell-worker", json.dumps(vars(args)), name, str(count), str(rank)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return found["row"], found["latency"]


def cell_worker(settings: str, name: str, count: str, rank: str) -> None:
    import torch

    args = argparse.Namespace(**json.loads(settings))
    if args.threads:
        torch.set_num_threads(args.threads)
    row, latency = measure(name, int(count), int(rank), args)
    print(json.dumps({"row": row, "latency": latency}), flush=True)


def table(rows: list[dict]) -> str:
    header = ("model", "adapter", "r", "N", "1 model MB", "N adapters MB", "N merged MB", "mem ratio", "RSS ratio",
              "merged x1 img/s", "mixed img/s", "switch img/s", "merged/task img/s", "mixed/merged", "paired")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r in rows:
        cells = [r["model"], r.get("adapter", "LoRA"), str(r["rank"]), str(r["tasks"]), f"{r['one_model_MB']:.1f}",
                 f"{r['adapters_MB']:.1f}",
                 f"{r['merged_MB']:.1f}", f"{r['memory_ratio']:.3f}", f"{r.get('memory_ratio_RSS', float('nan')):.3f}",
                 f"{r['reference_ips']:.1f}",
                 f"{r['mixed_ips']:.1f}", f"{r['switch_ips']:.1f}", f"{r['merged_per_task_ips']:.1f}",
                 f"{r['mixed_vs_merged']:.2f}", f"{r['mixed_vs_merged_paired']:.2f}"]
        lines.append(" | ".join(cells))
    return "\n".join(f"| {line} |" for line in lines)


def latency_table(rows: list[dict]) -> str:
    header = ("model", "r", "N tasks", "clients", "answered", "p50 ms", "p99 ms", "requests/s", "requests per pass",
              "passes mixing tasks")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r in rows:
        lines.append(" | ".join([r["model"], str(r["rank"]), str(r["tasks"]), str(r["clients"]), str(r["answered"]),
                                 f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}", f"{r['requests_per_s']:.1f}",
                                 f"{r['mean_batch']:.1f}", f"{100 * r['mixed_batches']:.0f}%"]))
    return "\n".join(f"| {line} |" for line in lines)


def verdicts(rows: list[dict]) -> list[str]:
    found = []
    for r in rows:
        what = f"{r['model']} {r.get('adapter', 'LoRA')} r={r['rank']}"
        if r["tasks"] == max(row["tasks"] for row in rows if row["model"] == r["model"]):
            ok = r["memory_ratio"] <= TARGET_MEMORY
            rss = f"; resident {r['memory_ratio_RSS']:.3f} x" if "memory_ratio_RSS" in r else ""
            ok = ok and r.get("memory_ratio_RSS", 0) <= TARGET_MEMORY
            found.append(f"{'PASS' if ok else 'FAIL'} {what} memory of {r['tasks']} tasks "
                         f"{r['memory_ratio']:.3f} x one model in tensor bytes{rss} (target <= {TARGET_MEMORY})")
        ok = r["mixed_vs_merged"] >= TARGET_THROUGHPUT
        found.append(f"{'PASS' if ok else 'FAIL'} {what} N={r['tasks']} mixed throughput "
                     f"{r['mixed_vs_merged']:.3f} x one merged model (target >= {TARGET_THROUGHPUT}; paired per "
                     f"arrival {r['mixed_vs_merged_paired']:.3f})")
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rss-worker"]:
        rss_worker(*argv[1:])
        return 0
    if argv[:1] == ["--cell-worker"]:
        cell_worker(*argv[1:])
        return 0
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows, latencies = [], []
    for name in args.models:
        for rank in args.ranks:
            for count in args.tasks:
                row, latency = measure_cell(name, count, rank, args)
                rows.append(row)
                latencies += [latency] if latency else []
                print(f"{name} r={rank} N={count}: done", flush=True)
    print(table(rows))
    if latencies:
        print(latency_table(latencies))
    checks = verdicts(rows)
    print("\n".join(checks))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {"settings": vars(args) | {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                                        "load_average_1min": load, "platform": platform.platform(),
                                        "torch": torch.__version__},
              "rows": rows, "latency": latencies, "checks": checks}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
