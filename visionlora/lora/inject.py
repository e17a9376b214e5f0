"""Put LoRA layers into a model in place, and freeze everything else.

The model keeps its own class (a timm model stays a timm model): each target module is replaced by a wrapper
that holds the original as ``base_layer``. All wrappers are built before any is swapped in, so a failure leaves
the model exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import LoraConfig
from .conv import LoraConv2d
from .frozen_a import frozen_factor_parameters, seed_frozen_factors
from .layer import DEFAULT_ADAPTER, LoraLayer
from .linear import LoraFusedQKV, LoraLinear
from .mha import LoraMultiheadAttention
from .targets import LayerSpec, base_modules, find_head_path, find_trainable_paths, specs_from_config

STATE_ATTR = "_visionlora_state"


@dataclass
class AdapterRecord:
    """One named adapter of a model: how it was made, what it trains fully, and its own classifier head."""

    config: LoraConfig
    specs: list[LayerSpec]
    trainable_paths: list[str]
    head: nn.Module | None = None  # at the model's head path while this adapter is active
    label_names: list[str] | None = None


@dataclass
class LoraState:
    """What :func:`inject_lora` and :func:`~visionlora.lora.adapters.add_adapter` did to a model: kept on the
    model so save/switch/unload can undo or export it. ``config``, ``specs`` and ``trainable_paths`` are the active
    adapter's."""

    adapters: dict[str, AdapterRecord]
    active: str
    head_path: str | None = None
    bn_hooks: list[RemovableHandle] = field(default_factory=list)

    @property
    def record(self) -> AdapterRecord:
        return self.adapters[self.active]

    @property
    def config(self) -> LoraConfig:
        return self.record.config

    @property
    def specs(self) -> list[LayerSpec]:
        return self.record.specs

    @property
    def trainable_paths(self) -> list[str]:
        return self.record.trainable_paths


def inject_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap the modules ``config.targets`` selects with LoRA layers and freeze the rest, in place.

    Args:
        model: Any ``nn.Module``; timm models also get their classifier head (``get_classifier()``) trained.
        config: What to adapt and how.

    Returns:
        The same model object, adapted: its adapter is named ``default`` (see :mod:`visionlora.lora.adapters` for
        more). Only LoRA parameters (``lora_*``), the head and ``config.trainable`` modules require grad afterwards.
    """
    return inject_adapter(model, config, DEFAULT_ADAPTER)


def inject_adapter(model: nn.Module, config: LoraConfig, name: str, head: nn.Module | None = None,
                   label_names: list[str] | None = None) -> nn.Module:
    """:func:`inject_lora` for a model without LoRA, naming the adapter; ``head`` replaces the model's own head."""
    config.validate()
    if lora_state(model) is not None or any(isinstance(m, LoraLayer) for m in model.modules()):
        raise ValueError("model already has LoRA layers: call unload_lora(model) before injecting again")
    specs = specs_from_config(model, config)
    layers = build_layers(model, specs, name)
    initialize_layers(layers, config.init)
    if config.freeze_A:
        for path, layer in layers.items():
            seed_frozen_factors(layer, layer.slot(name), path, config.A_seed)
    attach(model, layers, config, specs, name=name, head=head, label_names=label_names)
    return model


@torch.no_grad()
def initialize_layers(layers: dict[str, LoraLayer], init: str) -> None:
    """Initialise every wrapper; if one fails, put back the base weights PiSSA already changed in the others."""
    originals = {path: layer.base_weight().clone() for path, layer in layers.items()} if init == "pissa" else {}
    for path, layer in layers.items():
        try:
            layer.initialize(init)
        except Exception as err:
            for done, weight in originals.items():
                layers[done].base_weight().copy_(weight)
            if isinstance(err, ValueError):
                raise ValueError(f"{path}: {err}") from None
            raise


def build_layers(model: nn.Module, specs: list[LayerSpec], adapter: str = DEFAULT_ADAPTER) -> dict[str, LoraLayer]:
    """Build (but do not attach) one LoRA wrapper per spec, each holding adapter ``adapter``."""
    modules = base_modules(model)
    layers = {}
    for spec in specs:
        if spec.path not in modules:
            raise ValueError(f"adapter names module {spec.path!r}, which the model does not have")
        layers[spec.path] = build_layer(modules[spec.path], spec, adapter)
    return layers


WRAPPERS = {"linear": LoraLinear, "qkv": LoraFusedQKV, "conv": LoraConv2d, "mha": LoraMultiheadAttention}


def build_layer(module: nn.Module, spec: LayerSpec, adapter: str = DEFAULT_ADAPTER) -> LoraLayer:
    """One wrapper for ``module`` as ``spec`` describes; raises ValueError naming the module on a mismatch."""
    expected = {"linear": nn.Linear, "qkv": nn.Linear, "conv": nn.Conv2d, "mha": nn.MultiheadAttention}[spec.kind]
    if not isinstance(module, expected):
        raise ValueError(f"{spec.path} is a {type(module).__name__}, but the adapter expects a {expected.__name__}")
    common = dict(rank=spec.rank, scale=spec.scale, form=spec.form, adapter=adapter)
    try:
        if spec.kind == "linear":
            return LoraLinear(module, dropout=spec.dropout, use_dora=spec.use_dora, **common)
        if spec.kind == "qkv":
            return LoraFusedQKV(module, slices=spec.slices, dropout=spec.dropout, use_dora=spec.use_dora, **common)
        if spec.kind == "conv":
            return LoraConv2d(module, dropout=spec.dropout, use_dora=spec.use_dora, **common)
        _check_mha_spec(spec)
        return LoraMultiheadAttention(module, slices=spec.slices, adapt_out_proj=spec.adapt_out_proj, **common)
    except ValueError as err:
        raise ValueError(f"{spec.path}: {err}") from None


def build_slot(layer: LoraLayer, spec: LayerSpec, adapter: str) -> nn.Module:
    """A new slot for adapter ``adapter`` in an existing wrapper (not added yet); ValueError naming the module when
    the wrapper adapts the module in another way (another kind: all adapters of one layer must agree)."""
    if type(layer) is not WRAPPERS[spec.kind]:
        raise ValueError(f"{spec.path}: adapter {adapter!r} adapts it as {spec.kind!r}, but the model's adapters "
                         f"{layer.adapter_names()} hold it as a {type(layer).__name__}; every adapter of one layer "
                         f"must adapt it the same way (e.g. the same LoraConfig.split_qkv)")
    options = {"dropout": spec.dropout, "use_dora": spec.use_dora}
    if spec.kind == "qkv":
        options["slices"] = spec.slices
    elif spec.kind == "mha":
        _check_mha_spec(spec)
        options = {"slices": spec.slices, "adapt_out_proj": spec.adapt_out_proj}
    try:
        return layer.new_slot(spec.rank, spec.scale, form=spec.form, **options)
    except ValueError as err:
        raise ValueError(f"{spec.path}: {err}") from None


def _check_mha_spec(spec: LayerSpec) -> None:
    if spec.use_dora or spec.dropout:
        raise ValueError("DoRA and LoRA dropout are not supported for nn.MultiheadAttention")


def attach(model: nn.Module, layers: dict[str, LoraLayer], config: LoraConfig, specs: list[LayerSpec],
           trainable: list[str] | None = None, name: str = DEFAULT_ADAPTER, head: nn.Module | None = None,
           label_names: list[str] | None = None) -> None:
    """Swap the wrappers into a model without LoRA, then freeze everything but LoRA and the fully trained modules.

    The fully trained modules are ``trainable`` paths when given (a loaded adapter says which), else the head and
    the modules ``config.trainable`` matches. ``head`` (default: the model's own) becomes the adapter's head.
    """
    head_path = find_head_path(model)
    if head is not None:
        set_submodule(model, head_path, head)
    for path, layer in layers.items():
        layer.active_adapter = name
        set_submodule(model, path, layer)
    if trainable is None:
        trained_head = head_path if config.train_head else None
        trainable = [p for p in [trained_head, *find_trainable_paths(model, config.trainable)] if p]
    own_head = model.get_submodule(head_path) if head_path else None
    record = AdapterRecord(config=config, specs=specs, trainable_paths=trainable, head=own_head,
                           label_names=label_names)
    state = LoraState(adapters={name: record}, active=name, head_path=head_path)
    setattr(model, STATE_ATTR, state)
    freeze_for_lora(model, state)


def trained_module(model: nn.Module, state: LoraState, record: AdapterRecord, path: str) -> nn.Module:
    """The module an adapter trains fully at ``path``: its own head for the head path, else the model's module."""
    if path == state.head_path and record.head is not None:
        return record.head
    return model.get_submodule(path)


def freeze_for_lora(model: nn.Module, state: LoraState) -> None:
    """requires_grad only on LoRA parameters, trainable modules (every adapter's head) and (optionally) norms;
    freeze BN statistics."""
    for hook in state.bn_hooks:
        hook.remove()
    state.bn_hooks.clear()
    for name, param in model.named_parameters():
        param.requires_grad_(name.rpartition(".")[2].startswith("lora_"))
    for record in state.adapters.values():
        for path in record.trainable_paths:
            trained_module(model, state, record, path).requires_grad_(True)
    trained_paths = [path for record in state.adapters.values() for path in record.trainable_paths]
    for path, module in base_modules(model).items():
        if _is_norm(module) and state.config.train_norms:
            module.requires_grad_(True)
        trained_fully = any(path == p or path.startswith(p + ".") for p in trained_paths)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and state.config.freeze_bn_stats and not trained_fully:
            state.bn_hooks.append(module.register_forward_pre_hook(_keep_bn_in_eval))
    frozen = frozen_A_adapters(state)
    layers = lora_layers(model).values() if frozen else []
    for layer, name in ((layer, name) for layer in layers for name in frozen):
        slot = layer.slot_or_none(name)
        for factor in frozen_factor_parameters(layer, slot) if slot is not None else []:
            factor.requires_grad_(False)


def frozen_A_adapters(state: LoraState) -> list[str]:
    """The adapters trained with LoRA-FA (``LoraConfig.freeze_A``), whose A stays frozen."""
    return [name for name, record in state.adapters.items() if record.config.freeze_A]


def lora_state(model: nn.Module) -> LoraState | None:
    """The :class:`LoraState` that :func:`inject_lora` left on ``model``, or None."""
    return getattr(model, STATE_ATTR, None)


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Every LoRA wrapper in ``model`` by path."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LoraLayer)}


def _keep_bn_in_eval(module: nn.Module, _inputs) -> None:
    # A frozen backbone's BatchNorm uses and keeps its pretrained running statistics even in train mode
    # (as detectron2's FrozenBatchNorm2d does); few-shot batches are too small to estimate them.
    module.training = False


def _is_norm(module: nn.Module) -> bool:
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    return isinstance(module, norm_types) or type(module).__name__.endswith("Norm")


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` of ``model`` (replacing what was there)."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)
