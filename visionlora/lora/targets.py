"""Turn a :class:`LoraConfig` into a list of per-layer specs: which modules get LoRA, of which kind and rank.

Targets are regexes matched against the *full* dotted module path (``re.fullmatch``): ``proj`` never silently
catches ``patch_embed.proj``. A target that matches nothing is an error that lists the closest module names.
"""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import asdict, dataclass

from torch import nn

from .config import PRESETS, LoraConfig, expand_target
from .layer import LoraLayer, max_rank

KINDS = ("linear", "qkv", "conv", "mha")
# With several adapters, the model holds every adapter's classifier head here (see visionlora.lora.adapters).
HEADS_ATTR = "lora_heads"


@dataclass
class LayerSpec:
    """Everything needed to rebuild one LoRA layer (also stored in saved adapters)."""

    path: str
    kind: str
    rank: int
    scale: float
    slices: str = ""
    adapt_out_proj: bool = False
    dropout: float = 0.0
    use_dora: bool = False
    form: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)


def find_head_path(model: nn.Module) -> str | None:
    """The path of the classifier returned by timm's ``model.get_classifier()``, if the model has one."""
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        return None
    head = get_classifier()
    for path, module in model.named_modules():
        if module is head and path:
            return path
    return None


def find_trainable_paths(model: nn.Module, patterns: list[str]) -> list[str]:
    """Paths of modules that ``LoraConfig.trainable`` regexes fully match (trained fully, never wrapped)."""
    paths = [path for path, _ in model.named_modules() if path and any(re.fullmatch(p, path) for p in patterns)]
    return outermost(paths)


def outermost(paths: list[str]) -> list[str]:
    """The paths not nested in another listed path: a module's children are trained with it."""
    return [p for p in paths if not any(p.startswith(q + ".") for q in paths if q != p)]


def base_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module by path as it was before LoRA: each wrapper as its base layer, LoRA's own modules left out."""
    found: dict[str, nn.Module] = {}
    seen: set[int] = set()

    def visit(module: nn.Module, path: str) -> None:
        module = module.base_layer if isinstance(module, LoraLayer) else module
        if id(module) in seen:
            return
        seen.add(id(module))
        found[path] = module
        for name, child in module._modules.items():
            if child is not None and (path or name != HEADS_ATTR):
                visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    return found


def specs_from_config(model: nn.Module, config: LoraConfig) -> list[LayerSpec]:
    """Resolve targets, presets, excludes and per-layer rank/alpha into specs, in module order.

    Targets are matched against the model as it was before LoRA (:func:`base_modules`), so a model that already
    holds adapters gets the same specs as a fresh one.
    """
    modules = base_modules(model)
    protected = [p for p in [find_head_path(model), *find_trainable_paths(model, config.trainable)] if p]
    chosen: dict[str, tuple[str, str]] = {}  # path -> (kind, slices)
    for target in config.targets:
        found = _match_target(target, config, modules, protected)
        if not found:
            raise ValueError(_no_match_message(target, modules))
        for path, kind, slices in found:
            _add_choice(chosen, path, kind, slices)
    _fold_mha_out_proj(chosen, modules)
    specs = []
    for path, (kind, slices) in chosen.items():
        spec = _make_spec(path, kind, slices, modules[path], config)
        if spec is not None:
            specs.append(spec)
    return specs


def _match_target(target: str, config: LoraConfig, modules: dict, protected: list[str]) -> list[tuple]:
    found = []
    for pattern, slices in expand_target(target):
        for path, module in modules.items():
            if not path or _is_protected(path, protected) or any(re.fullmatch(e, path) for e in config.exclude):
                continue
            if _pattern_matches(pattern, path, module):
                kind = _kind_of(path, module, modules, config.split_qkv)
                if kind is not None:
                    found.append((path, kind, slices))
    return found


def _pattern_matches(pattern: str, path: str, module: nn.Module) -> bool:
    if pattern == "<conv>":
        return isinstance(module, nn.Conv2d)
    if pattern == "<conv1x1>":
        return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
    return re.fullmatch(pattern, path) is not None


def _kind_of(path: str, module: nn.Module, modules: dict, split_qkv: bool) -> str | None:
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    if isinstance(module, nn.Linear):
        parent = modules.get(path.rpartition(".")[0])
        if isinstance(parent, nn.MultiheadAttention) and path.endswith(".out_proj"):
            return "mha_out"
        if split_qkv and path.rpartition(".")[2] == "qkv" and module.out_features % 3 == 0:
            return "qkv"
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv"
    return None


def _is_protected(path: str, protected: list[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in protected)


def _add_choice(chosen: dict, path: str, kind: str, slices: str) -> None:
    if path in chosen and kind in ("qkv", "mha"):
        merged = set(chosen[path][1]) | set(slices)
        slices = "".join(s for s in "qkv" if s in merged)
    chosen[path] = (kind, slices)


def _fold_mha_out_proj(chosen: dict, modules: dict) -> None:
    """``attn.out_proj`` of an nn.MultiheadAttention is adapted by the attention wrapper, not as a Linear."""
    for path in [p for p, (kind, _) in chosen.items() if kind == "mha_out"]:
        del chosen[path]
        parent = path.rpartition(".")[0]
        slices = chosen[parent][1] if parent in chosen else ""
        chosen[parent] = ("mha+out", slices)


def _make_spec(path: str, kind: str, slices: str, module: nn.Module, config: LoraConfig) -> LayerSpec | None:
    adapt_out = kind == "mha+out"
    kind = "mha" if kind.startswith("mha") else kind
    rank = _capped_rank(path, kind, module, config.rank_for(path))
    if rank == 0:
        return None
    if kind in ("linear", "conv"):
        slices = ""
    return LayerSpec(path=path, kind=kind, rank=rank, scale=config.scale_for(path, rank), slices=slices,
                     adapt_out_proj=adapt_out, dropout=config.dropout, use_dora=config.use_dora, form=config.form)


def _capped_rank(path: str, kind: str, module: nn.Module, rank: int) -> int:
    """Cap r so the adapter is never larger than the weight block it adapts; 0 means skip the layer."""
    if kind == "conv":
        weight = module.weight
        rows, fan_in = weight.shape[0] // module.groups, weight[0].numel()
    elif kind == "qkv":
        rows, fan_in = module.out_features // 3, module.in_features
    elif kind == "mha":
        rows = fan_in = module.embed_dim
    else:
        rows, fan_in = module.out_features, module.in_features
    limit = max_rank(rows, fan_in)
    if limit == 0:
        warnings.warn(f"LoRA skips {path}: its {rows}x{fan_in} weight blocks are smaller than any rank-1 adapter; "
                      f"add it to LoraConfig.trainable to fine-tune it fully instead", stacklevel=4)
        return 0
    if rank > limit:
        warnings.warn(f"LoRA rank for {path} capped from {rank} to {limit} so the adapter is not larger than its "
                      f"{rows}x{fan_in} weight blocks", stacklevel=4)
        return limit
    return rank


def _no_match_message(target: str, modules: dict) -> str:
    names = [p for p in modules if p]
    probe = target.replace("\\", "").split("@")[0]
    close = difflib.get_close_matches(probe, names, n=5, cutoff=0.3) or names[:5]
    kind = "preset" if target in PRESETS else "pattern"
    return (f"LoraConfig.targets: {kind} {target!r} matches no Linear, Conv2d or MultiheadAttention module "
            f"(patterns must match the full module path). Closest module names: {', '.join(close)}")
