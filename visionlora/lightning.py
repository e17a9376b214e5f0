"""LoRA for an existing LightningModule, as a Lightning callback.

:class:`LoraCallback` adapts one submodule of the user's ``LightningModule`` with LoRA (Hu et al., 2021, "LoRA:
Low-Rank Adaptation of Large Language Models", arXiv:2106.09685) without changing the module's code, and writes the
adapter in PEFT's layout (:func:`visionlora.lora.save_adapter`) next to every Lightning checkpoint.

Hook order this relies on (Lightning 2.x, ``Trainer._run``): callback ``setup`` -> ``LightningModule.setup`` ->
``configure_model`` -> restore of the module's ``state_dict`` from ``ckpt_path`` -> ``strategy.setup``, which calls
``configure_optimizers``. So LoRA is in place (and the rest of the submodule frozen) both before a checkpoint's
weights are loaded and before the optimizer is built. A callback's ``on_load_checkpoint`` runs *after* the module's
``state_dict`` was loaded, so injecting there would be too late; it is only a safety net here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from visionlora.lora import LoraConfig, inject_lora, lora_layers, lora_state, merge_lora, save_adapter

ADAPTER_DIR_KEY = "visionlora_adapter_dir"
LAST_DIRNAME = "last"


class LoraCallback(pl.Callback):
    """Inject LoRA into ``pl_module.<module_attr>`` at setup and save the adapter with every checkpoint.

    Only the submodule named by ``module_attr`` is adapted: :func:`~visionlora.lora.inject_lora` freezes it except
    the ``lora_*`` parameters, its timm classifier head and ``config.trainable`` modules, and keeps its BatchNorm
    running statistics frozen when ``config.freeze_bn_stats``. Parameters of ``pl_module`` outside that submodule
    (an extra head, a loss with learnable weights) keep the ``requires_grad`` the user gave them.

    ``configure_optimizers`` runs after this callback's ``setup``, so it sees the frozen flags. Either pass
    ``filter(lambda p: p.requires_grad, self.parameters())`` to the optimizer (its state then holds only trainable
    parameters, and resuming needs the same filter), or pass ``self.parameters()``: frozen parameters never get a
    gradient, and torch optimizers skip parameters whose ``grad`` is None, so weight decay does not touch them.

    Adapters go to ``<trainer.log_dir or default_root_dir>/<adapter_dirname>/epoch=E-step=S/`` on each checkpoint
    (the path is recorded in ``checkpoint["visionlora_adapter_dir"]``) and to ``.../<adapter_dirname>/last/`` when
    fitting ends. Files are written by global rank 0 only, from its own copy of the weights: single-device and DDP
    work; sharded strategies (FSDP, DeepSpeed stage 3) would write rank 0's shard and are not supported.

    Args:
        config: What to adapt and how.
        module_attr: Attribute of the LightningModule holding the model to adapt; dotted paths such as
            ``"backbone.encoder"`` are followed attribute by attribute.
        merge_on_fit_end: Fold ΔW into the base weights (:func:`~visionlora.lora.merge_lora`) after the final
            adapter is saved, so inference after ``fit`` costs what the base model costs. The merged flag is not in
            the ``state_dict``, so a Lightning checkpoint saved later (``trainer.save_checkpoint``) gets the unmerged
            base weights and reloads like any other; call :func:`~visionlora.lora.unmerge_lora` before training
            again.
        adapter_dirname: Folder, under the log directory, that receives the adapters.
    """

    def __init__(self, config: LoraConfig, module_attr: str = "model", merge_on_fit_end: bool = False,
                 adapter_dirname: str = "adapters") -> None:
        if not isinstance(config, LoraConfig):
            raise TypeError(f"LoraCallback: config must be a LoraConfig, got {type(config).__name__}")
        if not module_attr or any(not part for part in module_attr.split(".")):
            raise ValueError(f"LoraCallback: module_attr must be an attribute path like 'model', got {module_attr!r}")
        if not adapter_dirname or Path(adapter_dirname).is_absolute():
            raise ValueError(f"LoraCallback: adapter_dirname must be a relative folder name, got {adapter_dirname!r}")
        config.validate()
        self.config = config
        self.module_attr = module_attr
        self.merge_on_fit_end = merge_on_fit_end
        self.adapter_dirname = adapter_dirname
        self._last_saved: Path | None = None

    # ----- injection ----------------------------------------------------------------------------------------
    def target_module(self, pl_module: nn.Module) -> nn.Module:
        """The submodule ``module_attr`` names; ValueError naming the attribute when it is missing."""
        module: Any = pl_module
        walked = []
        for part in self.module_attr.split("."):
            if not hasattr(module, part):
                owner = ".".join(walked) or type(pl_module).__name__
                raise ValueError(f"LoraCallback: {type(pl_module).__name__} has no attribute {self.module_attr!r} "
                                 f"({owner!r} has no {part!r}); set module_attr to the model to adapt")
            module = getattr(module, part)
            walked.append(part)
        if not isinstance(module, nn.Module):
            raise ValueError(f"LoraCallback: {type(pl_module).__name__}.{self.module_attr} is a "
                             f"{type(module).__name__}, not an nn.Module")
        return module

    def inject(self, pl_module: nn.Module) -> nn.Module:
        """Inject LoRA into the target submodule unless it already has LoRA; returns the submodule.

        Use it to rebuild a module before loading a checkpoint outside the Trainer, e.g. with
        ``module.load_state_dict(torch.load(path)["state_dict"])``.
        """
        module = self.target_module(pl_module)
        if lora_state(module) is None and not lora_layers(module):
            inject_lora(module, self.config)
        return module

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Every stage, not only "fit": validate/test/predict with ckpt_path load a state_dict that has LoRA keys.
        self.inject(pl_module)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Inside Trainer.fit, setup has injected already; this covers loops that call the hook before loading.
        self.inject(pl_module)

    # ----- saving -------------------------------------------------------------------------------------------
    def adapter_root(self, trainer: pl.Trainer) -> Path:
        """``<trainer.log_dir or default_root_dir>/<adapter_dirname>``. Call on every rank (log_dir broadcasts)."""
        return Path(trainer.log_dir or trainer.default_root_dir) / self.adapter_dirname

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        epoch, step = int(checkpoint["epoch"]), int(checkpoint["global_step"])
        directory = self.adapter_root(trainer) / f"epoch={epoch}-step={step}"
        # ModelCheckpoint may save several files at one step (top-k and last.ckpt): write the adapter once.
        if trainer.is_global_zero and self._last_saved != directory:
            save_adapter(self.target_module(pl_module), directory)
            self._last_saved = directory
        checkpoint[ADAPTER_DIR_KEY] = str(directory)
        # A fresh module loads the checkpoint unmerged and adds ΔW itself: merged weights would get it twice.
        prefix = self.module_attr + "."
        state = checkpoint["state_dict"]
        for key, value in unmerged_base_weights(self.target_module(pl_module)).items():
            if prefix + key in state:
                state[prefix + key] = value

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        directory = self.adapter_root(trainer) / LAST_DIRNAME
        module = self.target_module(pl_module)
        if trainer.is_global_zero:
            save_adapter(module, directory)
        if self.merge_on_fit_end:
            merge_lora(module)


@torch.no_grad()
def unmerged_base_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the base-layer tensors of every merged LoRA layer as they are unmerged, by ``state_dict`` key.

    The module itself stays merged, its tensors bit for bit as they were. Empty when no layer is merged.
    """
    found = {}
    for path, layer in lora_layers(module).items():
        if not layer.merged:
            continue
        merged = {key: value.clone() for key, value in layer.base_layer.state_dict().items()}
        layer.unmerge()
        for key, value in layer.base_layer.state_dict().items():
            found[f"{path}.base_layer.{key}"] = value.clone()
            value.copy_(merged[key])
        layer.merged = True
    return found
