"""The measuring half of ``bench_train_step.py``: runs ONE variant (or one inference comparison) in this process.

``bench_train_step.py`` starts a fresh interpreter per variant with ``--worker <json-spec>`` and reads the single
``RESULT {...}`` line this module prints, so each variant's peak RSS (``ru_maxrss``) is its own.
"""

from __future__ import annotations

import copy
import json
import re
import resource
import statistics
import time
from collections.abc import Callable

import psutil
import timm
import torch
import torch.nn.functional as F
from torch import nn

from visionlora.lora import LoraConfig, inject_lora, lora_layers, merge_lora, unload_lora

RESULT_PREFIX = "RESULT "
NUM_CLASSES = 10
RANK = 8
ALPHA = 8.0
LR = 1e-4
# Every attention and MLP projection of every ViT block; matched against the full module path.
VIT_TARGET = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"
# ConvNeXt: the pointwise MLP Linears of every block and the stride-2 downsample convs between stages.
CONVNEXT_TARGET = r"stages\.\d+\.(blocks\.\d+\.mlp\.fc[12]|downsample\.1)"
TRAIN_VARIANTS = ("full", "linear_probe", "input_grad_floor", "peft", "visionlora", "visionlora_gc",
                  "visionlora_activation", "visionlora_fused")
FLOOR_VARIANT = "input_grad_floor"
FORCED_FORMS = {"visionlora_activation": "activation", "visionlora_fused": "fused"}
PROFILE_ROWS = 15


def build_model(name: str, image_size: int, seed: int) -> nn.Module:
    """A randomly initialised timm model (no download) with a 10-class head, the same weights for every variant."""
    torch.manual_seed(seed)
    try:  # ViTs need their position embeddings sized for the image; other families take no img_size.
        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, img_size=image_size)
    except TypeError:
        torch.manual_seed(seed)
        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)


def head_path(model: nn.Module) -> str:
    """The dotted path of ``model.get_classifier()``."""
    head = model.get_classifier()
    return next(path for path, module in model.named_modules() if module is head and path)


def target_paths(model: nn.Module) -> tuple[str, list[str]]:
    """("vit", every block projection) when the model has them, ("convnext", its MLP Linears and downsample convs)
    for a ConvNeXt, else ("conv", every backbone Conv2d)."""
    linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(VIT_TARGET, p)]
    if linears:
        return "vit", linears
    kinds = (nn.Linear, nn.Conv2d)
    convnext = [p for p, m in model.named_modules() if isinstance(m, kinds) and re.fullmatch(CONVNEXT_TARGET, p)]
    if convnext:
        return "convnext", convnext
    head = head_path(model)
    convs = [p for p, m in model.named_modules() if isinstance(m, nn.Conv2d) and not p.startswith(head)]
    return "conv", convs


def lora_config(family: str, form: str = "auto", init: str = "default") -> LoraConfig:
    """visionlora's config with the targets, rank and alpha the PEFT variant uses (qkv as one matrix, like PEFT)."""
    targets = {"vit": [VIT_TARGET], "convnext": [CONVNEXT_TARGET]}.get(family, ["conv"])
    return LoraConfig(r=RANK, alpha=ALPHA, targets=targets, split_qkv=False, form=form, init=init)


def setup_variant(model: nn.Module, variant: str) -> tuple[nn.Module, dict]:
    """Freeze / wrap ``model`` as ``variant`` trains it; returns the model to train and facts about the setup."""
    family, paths = target_paths(model)
    info = {"family": family, "targets": len(paths)}
    if variant == "full":
        model.requires_grad_(True)
    elif variant == "linear_probe":
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
    elif variant == "input_grad_floor":
        # What any adapter method that adapts every block must at least pay: the forward pass and the backward pass
        # down to the input, without a single weight gradient or optimizer update.
        model.requires_grad_(False)
        info["input_grad"] = True
    elif variant == "peft":
        model = _setup_peft(model, paths)
    elif variant.startswith("visionlora"):
        inject_lora(model, lora_config(family, form=FORCED_FORMS.get(variant, "auto")))
        _check_adapted(set(lora_layers(model)), paths, variant)
        if variant == "visionlora_gc":
            model.set_grad_checkpointing(True)
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {TRAIN_VARIANTS}")
    return model, info


def _setup_peft(model: nn.Module, paths: list[str]) -> nn.Module:
    import peft  # only this variant pays for importing peft (and transformers)

    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=paths, modules_to_save=[head_path(model)])
    model = peft.get_peft_model(model, config)
    adapted = {p.removeprefix("base_model.model.") for p, m in model.named_modules() if hasattr(m, "lora_A")}
    _check_adapted(adapted, paths, "peft")
    return model


def _check_adapted(adapted: set[str], paths: list[str], variant: str) -> None:
    if adapted != set(paths):
        missing, extra = sorted(set(paths) - adapted)[:3], sorted(adapted - set(paths))[:3]
        raise RuntimeError(f"{variant} adapted {len(adapted)} modules, expected {len(paths)}: "
                           f"missing {missing}, extra {extra}")


def random_batch(batch_size: int, image_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
    return images, labels


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """One forward + backward + AdamW step (trainable parameters only) + zero_grad of ``model``, as a callable."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR) if trainable else None
    model.train()

    def step() -> None:
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        images.grad = None
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def time_train_steps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int,
                     warmup: int) -> list[float]:
    """Milliseconds of each timed training step (:func:`train_step`), after ``warmup`` untimed ones."""
    step = train_step(model, images, labels)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def run_interleaved(spec: dict) -> dict:
    """Several training variants in ONE process, one step of each per round in rotating order, so load from other
    processes and drift hit all of them alike; each variant's median and its median per-round ratio to the floor."""
    steps, forms = {}, {}
    for variant in spec["variants"]:
        model, info = setup_variant(build_model(spec["model"], spec["image_size"], spec["seed"]), variant)
        images, labels = random_batch(spec["batch_size"], spec["image_size"], spec["seed"])
        images.requires_grad_(info.pop("input_grad", False))
        steps[variant] = train_step(model, images, labels)
        if variant.startswith("visionlora"):
            steps[variant]()  # form='auto' measures on the first training step: before timing
            forms[variant] = count_forms(model)
    before = cpu_snapshot()
    times = time_interleaved(steps, rounds=spec["steps"], warmup=spec["warmup"])
    floor = times.get(FLOOR_VARIANT)
    result = {"other_cpu_share": other_cpu_share(before, cpu_snapshot()), "forms": forms}
    for variant, values in times.items():
        result[variant] = {**summarize(values), "times_ms": values}
        if floor:
            per_round = [t / f for t, f in zip(values, floor, strict=True)]
            result[variant]["over_floor"] = statistics.median(per_round)
    return result


def count_forms(model: nn.Module) -> dict[str, int]:
    """How many LoRA layers run in each form (fused / fused-split / weight / activation)."""
    names = [layer.form_name() for layer in lora_layers(model).values()]
    return {form: names.count(form) for form in ("fused", "fused-split", "weight", "activation")}


def profile_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """The top operators of one more training step (no optimizer) by self CPU time, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        F.cross_entropy(model(images), labels).backward()
    images.grad = None
    model.zero_grad(set_to_none=True)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:PROFILE_ROWS]]


def summarize(times_ms: list[float]) -> dict:
    ordered = sorted(times_ms)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {"median_ms": statistics.median(ordered), "p90_ms": p90, "n": len(ordered)}


def peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def cpu_snapshot() -> tuple[float, float, float]:
    """(wall clock, CPU seconds used by the whole machine, CPU seconds used by this process) right now."""
    machine = psutil.cpu_times()
    busy = sum(getattr(machine, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
    own = psutil.Process().cpu_times()
    return time.perf_counter(), busy, own.user + own.system


def other_cpu_share(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Fraction of all cores that OTHER processes (or the hypervisor) used between two snapshots: above ~0.1 the
    timings are suspect, since torch's OpenMP threads then wait for each other."""
    wall, busy, own = (b - a for a, b in zip(before, after, strict=True))
    return max(0.0, (busy - own) / (wall * (psutil.cpu_count() or 1)))


def run_train(spec: dict) -> dict:
    """One training variant: build, set up, time; peak RSS is this process's high-water mark."""
    model = build_model(spec["model"], spec["image_size"], spec["seed"])
    total_before = sum(p.numel() for p in model.parameters())
    model, info = setup_variant(model, spec["variant"])
    images, labels = random_batch(spec["batch_size"], spec["image_size"], spec["seed"])
    images.requires_grad_(info.pop("input_grad", False))
    rss_before = current_rss_mb()
    before = cpu_snapshot()
    times = time_train_steps(model, images, labels, spec["steps"], spec["warmup"])
    if spec["variant"].startswith("visionlora"):
        info["forms"] = count_forms(model)  # after the warmup steps, where form='auto' measured
    if spec.get("profile"):
        info["profile"] = profile_step(model, images, labels)
    return {
        **summarize(times),
        "other_cpu_share": other_cpu_share(before, cpu_snapshot()),
        "times_ms": times,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_train_mb": rss_before,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "base_params": total_before,
        **info,
    }


def merged_copy(model: nn.Module, family: str, seed: int, unload: bool) -> nn.Module:
    """A copy of ``model`` with a non-zero LoRA update injected and merged (and unloaded when ``unload``)."""
    adapted = copy.deepcopy(model)
    torch.manual_seed(seed + 2)  # the same factors for the merged and the unloaded copy
    inject_lora(adapted, lora_config(family, init="small-random"))
    merge_lora(adapted)
    if unload:
        unload_lora(adapted)
    return adapted.eval()


def time_interleaved(models: dict[str, Callable], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Time each callable once per round, rotating the order every round so drift hits all of them alike."""
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            models[name]()
            if index >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


@torch.no_grad()
def run_inference(spec: dict) -> dict:
    """Base forward vs the same model after inject + merge_lora (wrappers kept) and after unload_lora."""
    base = build_model(spec["model"], spec["image_size"], spec["seed"]).eval()
    family, _ = target_paths(base)
    models = {
        "base": base,
        "merged": merged_copy(base, family, spec["seed"], unload=False),
        "unloaded": merged_copy(base, family, spec["seed"], unload=True),
    }
    images, _ = random_batch(spec["batch_size"], spec["image_size"], spec["seed"])
    outputs = {name: model(images) for name, model in models.items()}
    calls = {name: (lambda m=model: m(images)) for name, model in models.items()}
    before = cpu_snapshot()
    times = time_interleaved(calls, rounds=spec["steps"], warmup=spec["warmup"])
    result = {name: summarize(t) for name, t in times.items()}
    result["other_cpu_share"] = other_cpu_share(before, cpu_snapshot())
    base_ms = result["base"]["median_ms"]
    return {
        **result,
        "merged_over_base": result["merged"]["median_ms"] / base_ms,
        "unloaded_over_base": result["unloaded"]["median_ms"] / base_ms,
        # The update is non-zero (outputs move), and merged and unloaded agree to float rounding.
        "max_abs_change_vs_base": (outputs["merged"] - outputs["base"]).abs().max().item(),
        "max_abs_diff_merged_unloaded": (outputs["merged"] - outputs["unloaded"]).abs().max().item(),
        "peak_rss_mb": peak_rss_mb(),
    }


def run_worker(spec_json: str) -> None:
    """Entry point of a worker process: run the spec and print ``RESULT <json>`` as the last stdout line."""
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    runners = {"inference": run_inference, "interleaved": run_interleaved, "train": run_train}
    result = runners[spec["kind"]](spec)
    result.update(threads=torch.get_num_threads())
    print(RESULT_PREFIX + json.dumps(result), flush=True)
