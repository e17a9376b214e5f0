"""CPU training-step cost of LoRA (visionlora vs Hugging Face PEFT) against full fine-tuning and a linear probe.

Each variant runs in its own fresh Python process (``--worker``), so its peak RSS is its own:

* ``full``: every parameter trainable.
* ``linear_probe``: only ``model.get_classifier()`` trainable.
* ``input_grad_floor``: nothing trainable, but the input needs a gradient: the forward pass plus the backward pass
  down to the input, no weight gradient, no optimizer. No LoRA step that adapts every block can cost less.
* ``peft``: ``peft.LoraConfig(r=8, lora_alpha=8, target_modules=<explicit names>, modules_to_save=[head])``.
* ``visionlora``: the same modules, rank and alpha (ViT: qkv as one matrix, ``split_qkv=False``, as PEFT does;
  ResNet: preset ``conv``, which the worker checks selects exactly PEFT's module list); ``form='auto'``.
* ``visionlora_activation`` / ``visionlora_fused``: the same with ``form='activation'`` / ``form='fused'`` forced
  (the fused form rides A in the frozen layer's GEMM/conv, see ``visionlora/lora/fused.py``); skipped, and marked so,
  where ``visionlora``'s ``form='auto'`` already chose that form for every layer.
* ``visionlora_gc``: ``visionlora`` plus timm's ``set_grad_checkpointing(True)`` (ViT models only).

Targets: ViT models adapt every ``blocks.N.attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``; ConvNeXt models every
block's pointwise ``mlp.fc1``/``mlp.fc2`` and the ``stages.N.downsample.1`` convs; other models every ``nn.Conv2d``
outside the head. Every step time is also printed as a ratio to ``input_grad_floor`` of the same run (``x floor``).
One step is forward + cross-entropy + backward + AdamW (lr 1e-4, trainable
parameters only) + zero_grad on a seeded random batch, timed with ``time.perf_counter`` after warmup steps. A further
worker per model times inference (eval, no_grad) of the base model against the same model after ``inject_lora`` +
``merge_lora`` and after ``unload_lora``, interleaved in rotating order so drift cancels.

The floor: a frozen-base LoRA step still needs the whole forward pass and the input-gradient half of the backward
pass (every layer must pass gradients down to the adapters below it); only the weight-gradient half and the big
optimizer update go away, so a LoRA step costs about 2/3 of a full step at best. Targets (from the issue,
vit_small_patch16_224 and resnet50 at batch 8, 224 px), printed PASS/FAIL from the measurements:

* vit_small: visionlora/floor <= 1.05, visionlora/full <= 0.75, visionlora_gc peak RSS <= 0.6 x full;
* resnet50 and convnext_tiny: visionlora/floor <= 1.10;
* every model: visionlora/peft <= 0.85, merged inference/base <= 1.02, peak RSS visionlora <= full.

``--profile`` adds one profiled step (torch.profiler, no optimizer) to the floor and visionlora workers and prints their
top operators by self CPU time side by side: where the time over the floor goes.

Peak RSS (``ru_maxrss``) includes the interpreter, torch and timm (and, for ``peft``, peft and transformers);
``dRSS`` is the growth over the RSS just before the first step, i.e. what training itself adds. Each library runs
with its defaults: PEFT, ``full`` and ``linear_probe`` leave BatchNorm in training mode (batch statistics), visionlora
freezes BatchNorm statistics (``freeze_bn_stats=True``). "merged" keeps the LoRA wrappers (one extra module call
per adapted layer); "unloaded" is the plain model again.

Run it on an otherwise idle machine: with as many torch threads as cores, any other busy process makes OpenMP
barriers wait for preempted threads and steps slow down many times over (the script warns when the load average is
high, and marks variants whose p90 exceeds 1.5 x the median).

Usage::

    python benchmarks/bench_train_step.py                 # vit_small_patch16_224, resnet50, convnext_tiny at 224 px
    python benchmarks/bench_train_step.py --quick         # vit_tiny + resnet18 at 96 px, < 1 min on 2 idle cores
    python benchmarks/bench_train_step.py --models resnet50 --variants full visionlora --steps 3 --warmup 1
    python benchmarks/bench_train_step.py --models vit_small_patch16_224 --threads 1 --steps 4 --warmup 1 --profile
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_MODELS = ["vit_small_patch16_224", "resnet50", "convnext_tiny"]
QUICK_MODELS = ["vit_tiny_patch16_224", "resnet18"]
VARIANTS = ["full", "linear_probe", "input_grad_floor", "peft", "visionlora", "visionlora_gc",
            "visionlora_activation", "visionlora_fused"]
PROFILED_VARIANTS = ("input_grad_floor", "visionlora")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "train_step.json"
RESULT_PREFIX = "RESULT "  # must match train_step_worker.RESULT_PREFIX (not imported: it pulls in torch)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", help=f"timm model names (default {DEFAULT_MODELS})")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="subset of variants (default: all)")
    parser.add_argument("--batch-size", type=int, help="images per step (default 8; 4 with --quick)")
    parser.add_argument("--image-size", type=int, help="square input size in pixels (default 224; 96 with --quick)")
    parser.add_argument("--steps", type=int, help="timed steps per variant (default 20; 5 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every worker")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model weights and the random batch")
    parser.add_argument("--no-inference", action="store_true", help="skip the base vs merged inference worker")
    parser.add_argument("--interleave", nargs="+", choices=VARIANTS, metavar="VARIANT",
                        help="also time these variants in one process, a step of each in turn (drift and other load "
                             "hit all alike): the robust ratio to the floor on a shared machine")
    parser.add_argument("--profile", action="store_true",
                        help="profile one extra step of the floor and visionlora: top operators side by side")
    parser.add_argument("--quick", action="store_true", help="small models and inputs: a smoke run of every path")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file (written atomically)")
    parser.add_argument("--append", action="store_true",
                        help="keep the other models already in --out (each with its own run's settings)")
    parser.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"models": QUICK_MODELS if quick else DEFAULT_MODELS, "variants": VARIANTS,
                "batch_size": 4 if quick else 8, "image_size": 96 if quick else 224,
                "steps": 5 if quick else 20, "warmup": 1 if quick else 3}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.threads < 1:
        parser.error("--steps, --batch-size and --threads must be >= 1 and --warmup >= 0")
    return args


def worker_specs(args: argparse.Namespace, model: str) -> list[dict]:
    """The processes to start for one model: one per training variant, then the inference comparison."""
    common = {"model": model, "batch_size": args.batch_size, "image_size": args.image_size, "steps": args.steps,
              "warmup": args.warmup, "threads": args.threads, "seed": args.seed}
    is_vit = "vit" in model or "deit" in model
    variants = [v for v in args.variants if v != "visionlora_gc" or is_vit]
    specs = [{**common, "kind": "train", "variant": v, "profile": args.profile and v in PROFILED_VARIANTS}
             for v in variants]
    if args.interleave:
        chosen = [v for v in args.interleave if v != "visionlora_gc" or is_vit]
        specs.append({**common, "kind": "interleaved", "variant": "interleaved", "variants": chosen})
    if not args.no_inference:
        specs.append({**common, "kind": "inference", "variant": "inference", "steps": 2 * args.steps})
    return specs


def run_worker_process(spec: dict) -> dict:
    """Start a fresh interpreter for ``spec``; return its result, or {"error": ...} when it failed."""
    threads = str(spec["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TQDM_DISABLE": "1"}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout or f"exit code {proc.returncode}")[-4000:]}
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def progress_line(index: int, total: int, spec: dict, result: dict, seconds: float) -> str:
    where = f"[{index}/{total}] {spec['model']} {spec['variant']}"
    if "error" in result:
        return f"{where}: FAILED after {seconds:.1f} s: {result['error'].strip().splitlines()[-1]}"
    if "skipped" in result:
        return f"{where}: skipped, {result['skipped']}"
    others = f"; others used {result['other_cpu_share']:.0%} of the CPUs ({seconds:.1f} s)"
    if spec["kind"] == "interleaved":
        ratios = ", ".join(f"{v} x{result[v]['over_floor']:.3f}" for v in spec["variants"] if "over_floor" in result[v])
        return f"{where}: per-round ratio to the floor {ratios}{others}"
    if spec["kind"] == "inference":
        return (f"{where}: base {result['base']['median_ms']:.1f} ms, merged x{result['merged_over_base']:.3f}, "
                f"unloaded x{result['unloaded_over_base']:.3f}{others}")
    noisy = "  NOISY (p90 > 1.5 x median)" if result["p90_ms"] > 1.5 * result["median_ms"] else ""
    return (f"{where}: {result['median_ms']:.1f} ms/step (p90 {result['p90_ms']:.1f}), "
            f"peak RSS {result['peak_rss_mb']:.0f} MB{others}{noisy}")


def same_as_auto(spec: dict, train: dict) -> dict | None:
    """A "skipped" result when forcing a form would rebuild exactly the model ``visionlora`` timed (its form='auto'
    already chose that form for every layer): nothing to learn."""
    forced = {"visionlora_activation": "activation", "visionlora_fused": "fused"}.get(spec["variant"])
    forms = train.get("visionlora", {}).get("forms")
    if forced is None or not forms or sum(forms.values()) != forms.get(forced, 0):
        return None
    return f"identical to visionlora: form='auto' chose the {forced} form for all {forms[forced]} layers"


def run_all(args: argparse.Namespace) -> dict:
    """Run every worker one after another (never two at once: they would share the cores)."""
    specs = [spec for model in args.models for spec in worker_specs(args, model)]
    results: dict[str, dict] = {m: {"train": {}} for m in args.models}
    for index, spec in enumerate(specs, start=1):
        start = time.perf_counter()
        skipped = same_as_auto(spec, results[spec["model"]]["train"])
        result = {"skipped": skipped} if skipped else run_worker_process(spec)
        print(progress_line(index, len(specs), spec, result, time.perf_counter() - start), flush=True)
        entry = results[spec["model"]]
        if spec["kind"] in ("inference", "interleaved"):
            entry[spec["kind"]] = result
        else:
            entry["train"][spec["variant"]] = result
            if "family" in result:
                entry.update(family=result["family"], targets=result["targets"])
    return results


def busy_warning(threads: int) -> str | None:
    """A warning when other processes already load the CPUs: with every core in use, torch's OpenMP barriers wait
    for preempted threads and steps slow down many times over, so the timings would say nothing."""
    load = os.getloadavg()[0]
    if load < 0.5:
        return None
    return (f"WARNING: 1-minute load average is {load:.1f} before starting: other processes may compete for the "
            f"{os.cpu_count()} cores (torch threads per worker: {threads}); each worker reports what they used")


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "timm", "peft", "visionlora"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "loadavg_before": os.getloadavg(), **versions}


def print_report(args: argparse.Namespace, results: dict, checks: list[dict]) -> dict[str, float]:
    """The tables, the targets and any contention warning; returns the contended workers."""
    from train_step_report import contended_workers, format_contended, format_profiles, format_table, format_targets

    print()
    for model, result in results.items():
        print(format_table(model, result), end="\n\n")
        if args.profile:
            print(format_profiles(model, result["train"]), end="\n\n")
    print(format_targets(checks))
    contended = contended_workers(results)
    if contended:
        print("  " + format_contended(contended))
    if args.quick:
        print("  (--quick runs smaller models and inputs: the targets are meant for the default run)")
    return contended


def run_benchmark(args: argparse.Namespace) -> int:
    """Every worker, then the report and the JSON file; exit status 1 when a worker failed."""
    from train_step_report import check_targets

    from visionlora.files import write_json_atomic

    started = time.perf_counter()
    print(f"threads {args.threads}, batch {args.batch_size}, image {args.image_size}, steps {args.steps} "
          f"(+{args.warmup} warmup); one fresh process per variant", flush=True)
    warning = busy_warning(args.threads)
    if warning:
        print(warning, flush=True)
    env = environment()
    results = run_all(args)
    checks = check_targets(results)
    contended = print_report(args, results, checks)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "out")}
    env["loadavg_after"] = os.getloadavg()
    data = {"settings": settings, "environment": env, "results": results, "targets": checks, "contended": contended,
            "wall_s": time.perf_counter() - started}
    if args.append:
        data = appended(args.out, data)
    write_json_atomic(args.out, data)
    print(f"\nwrote {args.out} ({data['wall_s']:.0f} s)")
    failed = any("error" in r for res in results.values() for r in [*res["train"].values(), res.get("inference", {})])
    return 1 if failed else 0


def appended(path: Path, data: dict) -> dict:
    """``data`` with the other models of the results file at ``path`` kept, each with the settings, environment and
    targets of the run that measured it (``runs``), so models run one at a time make one file."""
    runs = {model: {k: data[k] for k in ("settings", "environment", "wall_s")} for model in data["results"]}
    if path.is_file():
        old = json.loads(path.read_text())
        old_runs = old.get("runs") or {m: {k: old[k] for k in ("settings", "environment", "wall_s")}
                                        for m in old["results"]}
        for model, result in old["results"].items():
            if model not in data["results"]:
                data["results"][model] = result
                runs[model] = old_runs[model]
                data["targets"] += [c for c in old["targets"] if c["model"] == model]
    return {**data, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.worker:
        return run_benchmark(args)
    from train_step_worker import run_worker

    run_worker(args.worker)
    sys.stdout.flush()
    sys.stderr.flush()
    # The result is out; skip the interpreter's teardown of torch (~0.7 s a worker, a tenth of --quick).
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
