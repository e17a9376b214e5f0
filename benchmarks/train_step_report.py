"""The reporting half of ``bench_train_step.py``: the per-model table, the issue's targets, the JSON file."""

from __future__ import annotations

LORA_VARIANTS = ("visionlora", "visionlora_gc", "visionlora_activation", "visionlora_fused")
FLOOR = "input_grad_floor"
COLUMNS = (("variant", 21), ("median ms", 10), ("p90 ms", 9), ("x floor", 8), ("x full", 7), ("vl/peft", 8),
           ("peak RSS MB", 12),
           ("RSS x full", 11), ("dRSS MB", 8),
           ("dRSS x full", 12), ("trainable", 11), ("total", 11))
# (family, description, limit): the issues' targets; each is checked on the models of that family that ran.
# Issue 17: a step within 5% (ViT) / 10% (convnets) of the input-gradient floor, and <= 0.85 x PEFT's.
# "interleaved ..." reads the --interleave worker (one process, steps in turn), the robust ratio on a loaded machine.
COMMON_TARGETS = [("time visionlora/peft", 0.85), ("interleaved visionlora/peft", 0.85),
                  ("peak RSS visionlora/full", 1.0), ("inference merged/base", 1.02)]
TARGETS = {
    "vit": [("time visionlora/input_grad_floor", 1.05), ("interleaved visionlora/input_grad_floor", 1.05),
            ("time visionlora/full", 0.75), ("peak RSS visionlora_gc/full", 0.6), *COMMON_TARGETS],
    "conv": [("time visionlora/input_grad_floor", 1.10), ("interleaved visionlora/input_grad_floor", 1.10),
             ("time visionlora/full", 1.0), *COMMON_TARGETS],
    "convnext": [("time visionlora/input_grad_floor", 1.10), ("interleaved visionlora/input_grad_floor", 1.10),
                 *COMMON_TARGETS],
}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _metric(train: dict, variant: str, key: str) -> float | None:
    return train.get(variant, {}).get(key)


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _rss_growth(result: dict) -> float | None:
    """Peak RSS minus the RSS just before the first step: the memory training itself adds."""
    if "peak_rss_mb" not in result:
        return None
    return result["peak_rss_mb"] - result["rss_before_train_mb"]


def table_rows(train: dict) -> list[list[str]]:
    """One row per variant: times, ratios to full (and visionlora/peft), memory and parameter counts."""
    full_ms, peft_ms = _metric(train, "full", "median_ms"), _metric(train, "peft", "median_ms")
    floor_ms = _metric(train, FLOOR, "median_ms")
    full_rss = _metric(train, "full", "peak_rss_mb")
    full_growth = _rss_growth(train.get("full", {}))
    rows = []
    for variant, r in train.items():
        if "error" in r or "skipped" in r:
            note = "ERROR: " + r["error"].strip().splitlines()[-1][:90] if "error" in r else "= " + r["skipped"]
            rows.append([variant, note])
            continue
        vs_peft = ratio(r["median_ms"], peft_ms) if variant in LORA_VARIANTS else None
        rows.append([
            variant, _fmt(r["median_ms"], ".1f"), _fmt(r["p90_ms"], ".1f"), _fmt(ratio(r["median_ms"], floor_ms)),
            _fmt(ratio(r["median_ms"], full_ms)),
            _fmt(vs_peft), _fmt(r["peak_rss_mb"], ".0f"), _fmt(ratio(r["peak_rss_mb"], full_rss)),
            _fmt(_rss_growth(r), ".0f"), _fmt(ratio(_rss_growth(r), full_growth)), f"{r['trainable_params']:,}",
            f"{r['total_params']:,}",
        ])
    return rows


def format_table(model: str, result: dict) -> str:
    """The table for one model, its inference line and the visionlora LoRA forms chosen."""
    lines = [f"== {model} ({result.get('family', '?')}, {result.get('targets', '?')} target modules) =="]
    header = _join([name for name, _ in COLUMNS])
    lines += [header, "-" * len(header)]
    for row in table_rows(result["train"]):
        if len(row) == 2:
            lines.append(row[0].ljust(COLUMNS[0][1]) + " " + row[1])
            continue
        lines.append(_join(row))
    lines.append(inference_line(result.get("inference", {})))
    if "interleaved" in result:
        lines.append(interleaved_line(result["interleaved"]))
    forms = {v: r["forms"] for v, r in result["train"].items() if "forms" in r}
    if forms:
        lines.append("LoRA forms chosen (fused/fused-split/weight/activation layers): "
                     + ", ".join(f"{v} {f['fused']}/{f.get('fused-split', 0)}/{f['weight']}/{f['activation']}"
                                 for v, f in forms.items()))
    return "\n".join(lines)


def _join(cells: list[str]) -> str:
    """First column left-aligned, the rest right-aligned, to the widths in COLUMNS."""
    widths = [width for _, width in COLUMNS]
    return "".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


def interleaved_line(interleaved: dict) -> str:
    if "error" in interleaved:
        return "interleaved: ERROR " + interleaved["error"].strip().splitlines()[-1][:100]
    cells = [f"{v} {r['median_ms']:.0f} ms x{r['over_floor']:.3f}" for v, r in interleaved.items()
             if isinstance(r, dict) and "over_floor" in r]
    return "interleaved in one process (median, median per-round ratio to the floor): " + ", ".join(cells)


def inference_line(inference: dict) -> str:
    if not inference:
        return "inference: not run"
    if "error" in inference:
        return "inference: ERROR " + inference["error"].strip().splitlines()[-1][:100]
    return (f"inference (eval, no_grad, interleaved): base {inference['base']['median_ms']:.1f} ms, "
            f"merged {inference['merged']['median_ms']:.1f} ms (x{inference['merged_over_base']:.3f}), "
            f"unloaded {inference['unloaded']['median_ms']:.1f} ms (x{inference['unloaded_over_base']:.3f}); "
            f"|merged-unloaded| max {inference['max_abs_diff_merged_unloaded']:.1e}")


def target_value(name: str, result: dict) -> float | None:
    """The measured value behind one target description, or None when a variant it needs did not run."""
    train = result["train"]
    if name == "inference merged/base":
        return result.get("inference", {}).get("merged_over_base")
    kind, pair = name.rsplit(" ", 1)
    top, bottom = pair.split("/")
    if kind == "interleaved":
        over = {v: r.get("over_floor") for v, r in result.get("interleaved", {}).items() if isinstance(r, dict)}
        return ratio(over.get(top), over.get(bottom)) if bottom != FLOOR else over.get(top)
    key = "median_ms" if kind == "time" else "peak_rss_mb"
    return ratio(_metric(train, top, key), _metric(train, bottom, key))


def check_targets(results: dict) -> list[dict]:
    """PASS/FAIL of every target that applies to a model that ran, computed from the measurements."""
    checks = []
    for model, result in results.items():
        for name, limit in TARGETS.get(result.get("family"), []):
            value = target_value(name, result)
            status = "n/a" if value is None else ("PASS" if value <= limit else "FAIL")
            checks.append({"model": model, "target": name, "value": value, "limit": limit, "status": status})
    return checks


def format_targets(checks: list[dict]) -> str:
    lines = ["Targets (issues; set for vit_small_patch16_224 / resnet50 / convnext_tiny at batch 8, 224 px):"]
    for c in checks:
        lines.append(f"  {c['status']:4}  {c['model']:24} {c['target']:40} {_fmt(c['value'], '.3f'):>7} "
                     f"<= {c['limit']:.2f}")
    return "\n".join(lines)


def format_profiles(model: str, train: dict, width: int = 44) -> str:
    """The profiled step's top operators (self CPU ms, share) of the floor and of visionlora, side by side."""
    profiles = {v: train.get(v, {}).get("profile") for v in (FLOOR, "visionlora")}
    if not all(profiles.values()):
        return f"profile of {model}: not recorded (both {FLOOR} and visionlora must run with --profile)"
    lines = [f"profile of one step, {model} (top operators by self CPU time):",
             "".join(f"{v + ' (self ms, share)':<{width + 4}}" for v in profiles)]
    rows = max(len(p) for p in profiles.values())
    for index in range(rows):
        cells = []
        for rows_ in profiles.values():
            e = rows_[index] if index < len(rows_) else None
            cell = "" if e is None else f"{e['op'][:width - 16]:<{width - 16}} {e['self_ms']:8.1f} {e['share']:6.1%}"
            cells.append(f"{cell:<{width + 4}}")
        lines.append("".join(cells).rstrip())
    return "\n".join(lines)


def contended_workers(results: dict, threshold: float = 0.1) -> dict[str, float]:
    """{"model/variant": share} for every worker during whose timing other processes used > ``threshold`` of the
    CPUs."""
    found = {}
    for model, result in results.items():
        workers = {**result["train"], **{kind: result.get(kind, {}) for kind in ("inference", "interleaved")}}
        for variant, r in workers.items():
            share = r.get("other_cpu_share")
            if share is not None and share > threshold:
                found[f"{model}/{variant}"] = share
    return found


def format_contended(contended: dict[str, float]) -> str:
    """One warning line naming the contended workers (or only counting them when there are many)."""
    shares = sorted(contended.values())
    which = ", ".join(f"{k} ({v:.0%})" for k, v in contended.items()) if len(contended) <= 4 else (
        f"others used {shares[0]:.0%}-{shares[-1]:.0%} of the CPUs")
    return (f"WARNING: other processes used > 10% of the CPUs while timing {len(contended)} worker(s), so these "
            f"timings are unreliable: {which}")


def markdown_table(results: dict) -> str:
    """The issue-17 table from a results file: interleaved ratios to the floor (and to PEFT), separate-process
    medians, peak RSS over full fine-tuning and merged/base inference, one row per model."""
    header = ("| model (targets) | floor ms | visionlora x floor | visionlora_fused x floor | PEFT x floor "
              "| visionlora / PEFT | separate processes: visionlora x floor | peak RSS visionlora / full "
              "| merged / base | forms fused/split/weight/act. |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for model, result in results.items():
        inter, train = result.get("interleaved", {}), result["train"]
        over = {v: r.get("over_floor") for v, r in inter.items() if isinstance(r, dict)}
        forms = inter.get("forms", {}).get("visionlora") or train.get("visionlora", {}).get("forms") or {}
        cells = [
            f"{model} ({result.get('targets', '?')} {result.get('family', '')} targets)",
            _fmt(inter.get(FLOOR, {}).get("median_ms"), ".0f"), _fmt(over.get("visionlora")),
            _fmt(over.get("visionlora_fused")), _fmt(over.get("peft")),
            _fmt(ratio(over.get("visionlora"), over.get("peft"))),
            _fmt(ratio(_metric(train, "visionlora", "median_ms"), _metric(train, FLOOR, "median_ms"))),
            _fmt(ratio(_metric(train, "visionlora", "peak_rss_mb"), _metric(train, "full", "peak_rss_mb"))),
            _fmt(result.get("inference", {}).get("merged_over_base"), ".3f"),
            "/".join(str(forms.get(k, "-")) for k in ("fused", "fused-split", "weight", "activation")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the markdown table of a results file (docs/engine.md's table)."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description="Markdown table of a bench_train_step.py results file.")
    parser.add_argument("results", type=Path, help="benchmarks/results/train_step.json or another --out file")
    args = parser.parse_args(argv)
    print(markdown_table(json.loads(args.results.read_text())["results"]))


if __name__ == "__main__":
    main()
