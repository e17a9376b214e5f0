"""Show what a LoRA config adapts in a timm model, and check that it merges exactly.

    python tools/lora_summary.py vit_small_patch16_224 --targets attn-qv --r 8

Builds the model (random weights unless --pretrained), injects LoRA, prints the per-layer table, then checks on a
random batch that the output is unchanged at init and that merged == unmerged after perturbing the factors. A bad
LoRA config (an unknown field, a value out of range) is one line ``error: ...`` and exit code 2. ``--train-step``
runs one training step first, so the ``form`` column shows what ``form='auto'`` measured (``?``: not yet).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import timm
import torch
import yaml

from visionlora import LoraConfig, inject_lora, lora_summary, merge_lora


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="vit_small_patch16_224", help="timm model name")
    parser.add_argument("--config", help="YAML file of LoraConfig fields (e.g. configs/lora/vit_attn_qv.yaml)")
    parser.add_argument("--targets", nargs="+", help="presets or full-path regexes (overrides --config)")
    parser.add_argument("--r", type=int, help="LoRA rank (overrides --config)")
    parser.add_argument("--alpha", type=float, help="LoRA alpha, scale = alpha / r (overrides --config)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs the hub)")
    parser.add_argument("--image-size", type=int, default=None, help="input size for the checks")
    parser.add_argument("--form", choices=["auto", "activation", "weight", "fused"], help="LoraConfig.form")
    parser.add_argument("--train-step", action="store_true",
                        help="run one training step first, so the table shows the forms form='auto' measured")
    return parser.parse_args(argv)


def lora_config(args: argparse.Namespace) -> LoraConfig:
    """The file's fields, then the flags; raises ValueError (one line, naming the file and field) on bad input."""
    fields = {"targets": ["attn-qv"]}
    if args.config:
        fields.update(read_lora_fields(Path(args.config)))
    overrides = {"targets": args.targets, "r": args.r, "alpha": args.alpha, "form": args.form}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return LoraConfig(**fields)


def read_lora_fields(path: Path) -> dict:
    """The LoraConfig fields of a YAML file, checked: known names only, values LoraConfig accepts."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        fields = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ValueError(f"{path}: not valid YAML ({where}{getattr(error, 'problem', None) or error})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{path}: expected a mapping of LoraConfig fields, got a {type(fields).__name__}")
    valid = [field.name for field in dataclasses.fields(LoraConfig)]
    unknown = [name for name in fields if name not in valid]
    if unknown:
        raise ValueError(f"{path}: unknown LoraConfig field {unknown[0]!r}; valid fields: {', '.join(valid)}")
    try:
        LoraConfig(**{"targets": ["attn-qv"], **fields})
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: {error}") from None
    return fields


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = lora_config(args)
        model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes).eval()
    except (ValueError, RuntimeError) as error:  # a bad config; an unknown timm model
        return fail(error)
    size = args.image_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
        try:
            inject_lora(model, config)
        except ValueError as error:  # targets that match nothing in this model
            return fail(error)
        if args.train_step:
            with torch.enable_grad():  # form='auto' times the forms on the first training step (train mode, grads)
                model.train()(x).sum().backward()
            model.eval().zero_grad(set_to_none=True)
        print(lora_summary(model))
        at_init = model(x)
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_out_B" in name:
                param.normal_(0, 0.02)
        unmerged = model(x)
        merge_lora(model)
        merged = model(x)
    scale = unmerged.abs().max().item()
    print(f"output change at init: {(at_init - before).abs().max().item():.2e}")
    print(f"merged vs unmerged:     {(merged - unmerged).abs().max().item() / scale:.2e} (relative to output scale)")
    return 0


def fail(error: Exception) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
