"""LoraCallback on a plain user-written LightningModule: what trains, what is saved, merge, resume."""

import os
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from visionlora.lightning import LoraCallback
from visionlora.lora import LoraConfig, load_adapter, lora_layers, unmerge_lora

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NUM_CLASSES = 3
SIZE = 32
BATCH = 4
SAMPLES = 8  # two steps per epoch


def make_backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # zero_init_last=False: timm zeroes each residual block's last BN scale, which would leave the LoRA factors
    # inside the blocks without gradient for these few steps.
    return timm.create_model("test_resnet", pretrained=False, num_classes=NUM_CLASSES, zero_init_last=False)


class Classifier(L.LightningModule):
    """What a user writes without knowing about LoRA, plus a learnable temperature outside ``self.model``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.model = make_backbone(seed)
        self.log_temperature = nn.Parameter(torch.zeros(()))
        self.optimized_params = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.log_temperature.exp()

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        self.optimized_params = sum(p.numel() for p in params)
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)


class Wrapped(L.LightningModule):
    """The backbone two attributes deep, for dotted ``module_attr`` paths."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Module()
        self.net.backbone = make_backbone()


def make_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(SAMPLES, 3, SIZE, SIZE, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (SAMPLES,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=BATCH)


def make_trainer(root, max_steps: int, callbacks: list, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root, callbacks=callbacks, **kwargs)


def conv_config() -> LoraConfig:
    return LoraConfig(r=4, alpha=8.0, targets=["conv"])


def state_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def probe() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))


def test_fit_trains_only_lora_and_head_and_saves_adapters(tmp_path):
    module = Classifier()
    callback = LoraCallback(conv_config())
    bn_before = {k: v.clone() for k, v in module.model.state_dict().items() if "running_" in k or "num_batches" in k}
    callback.inject(module)
    before = state_copy(module.model)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    temperature_before = module.log_temperature.detach().clone()

    trainer = make_trainer(tmp_path, 3, [callback])
    trainer.fit(module, make_loader())
    assert trainer.global_step == 3

    # setup ran again inside fit (module already injected): no second layer of wrappers.
    assert len(lora_layers(module.model)) == 15
    assert not any(".base_layer.base_layer." in k for k in module.model.state_dict())
    after = state_copy(module.model)
    assert list(after) == list(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable
    assert all("lora_" in k or k.startswith("fc.") for k in changed)
    assert {"fc.weight", "fc.bias"} <= changed
    assert all(torch.equal(after[k], v) for k, v in bn_before.items())
    assert len(bn_before) == 3 * 15
    # Outside the adapted submodule, the user's parameter stays trainable and was optimised.
    assert module.log_temperature.requires_grad
    assert not torch.equal(module.log_temperature.detach(), temperature_before)
    # configure_optimizers ran after setup: it saw only LoRA, head and the temperature.
    lora_and_head = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    assert module.optimized_params == lora_and_head + 1
    assert 0 < lora_and_head < sum(p.numel() for p in module.model.parameters()) // 5

    adapters = tmp_path / "adapters"
    checkpoint_dir = adapters / "epoch=1-step=3"
    # One adapter per checkpoint saved; ModelCheckpoint pruned epoch=0-step=2.ckpt but not its adapter.
    assert sorted(p.name for p in adapters.iterdir()) == ["epoch=0-step=2", "epoch=1-step=3", "last"]
    for directory in (checkpoint_dir, adapters / "last"):
        assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    (checkpoint_file,) = (tmp_path / "checkpoints").glob("*.ckpt")
    checkpoint = torch.load(checkpoint_file, weights_only=False)
    assert checkpoint["visionlora_adapter_dir"] == str(checkpoint_dir)

    module.model.eval()
    x = probe()
    with torch.no_grad():
        expected = module.model(x)
        for directory in (checkpoint_dir, adapters / "last"):
            fresh = load_adapter(make_backbone(), directory).eval()
            torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(make_backbone().eval()(x), expected, atol=1e-3)


def test_merge_on_fit_end_leaves_merged_layers(tmp_path):
    module = Classifier()
    trainer = make_trainer(tmp_path, 3, [LoraCallback(conv_config(), merge_on_fit_end=True)],
                           enable_checkpointing=False)
    trainer.fit(module, make_loader())

    layers = lora_layers(module.model)
    assert len(layers) == 15 and all(layer.merged for layer in layers.values())
    assert not (tmp_path / "checkpoints").exists()
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["last"]
    module.model.eval()
    x = probe()
    with torch.no_grad():
        merged = module.model(x)
        from_adapter = load_adapter(make_backbone(), tmp_path / "adapters" / "last").eval()(x)
        unmerged = unmerge_lora(module.model)(x)
    assert not any(layer.merged for layer in layers.values())
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged, from_adapter, rtol=0, atol=1e-5)


def test_missing_module_attr_raises_naming_it(tmp_path):
    trainer = make_trainer(tmp_path, 1, [LoraCallback(conv_config(), module_attr="backbone")])
    with pytest.raises(ValueError, match="'backbone'"):
        trainer.fit(Classifier(), make_loader())
    with pytest.raises(ValueError, match=r"'net\.encoder'.*'net' has no 'encoder'"):
        LoraCallback(conv_config(), module_attr="net.encoder").inject(Wrapped())
    with pytest.raises(ValueError, match="module_attr"):
        LoraCallback(conv_config(), module_attr="net.")


def test_dotted_module_attr_and_setup_twice_inject_once():
    module = Wrapped()
    callback = LoraCallback(conv_config(), module_attr="net.backbone")
    callback.setup(None, module, "fit")
    first = lora_layers(module.net.backbone)
    callback.setup(None, module, "fit")
    second = lora_layers(module.net.backbone)
    assert len(first) == 15
    assert list(first) == list(second) and all(first[k] is second[k] for k in first)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("net.backbone.fc.") for n in trainable)


class StateAtTrainStart(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.state = state_copy(pl_module)


def test_resume_from_checkpoint(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = Classifier(seed=0)
    make_trainer(tmp_path, 2, [LoraCallback(conv_config()), checkpoints]).fit(first, make_loader())
    saved = torch.load(checkpoints.last_model_path, weights_only=False)
    assert saved["global_step"] == 2
    assert any("lora_" in k for k in saved["state_dict"])

    # A fresh module with other base weights: everything must come from the checkpoint.
    second, seen = Classifier(seed=1), StateAtTrainStart()
    resumed = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(tmp_path, 4, [LoraCallback(conv_config()), resumed, seen])
    trainer.fit(second, make_loader(), ckpt_path=checkpoints.last_model_path)
    assert trainer.global_step == 4
    assert list(seen.state) == list(saved["state_dict"])
    assert all(torch.equal(seen.state[k], v) for k, v in saved["state_dict"].items())
    assert len(lora_layers(second.model)) == 15
    final = torch.load(resumed.last_model_path, weights_only=False)
    assert final["global_step"] == 4
    final_adapter = Path(final["visionlora_adapter_dir"])
    assert final_adapter.parent == tmp_path / "adapters" and final_adapter.name.endswith("-step=4")
    assert (final_adapter / "adapter_model.safetensors").is_file()
    assert {"epoch=0-step=2", final_adapter.name, "last"} <= {p.name for p in final_adapter.parent.iterdir()}


def test_checkpoint_saved_after_merge_on_fit_end_reloads_to_the_same_outputs(tmp_path):
    """A checkpoint written after merge_on_fit_end holds unmerged weights: a reload applies ΔW once, not twice."""
    module = Classifier()
    trainer = make_trainer(tmp_path, 3, [LoraCallback(conv_config(), merge_on_fit_end=True)],
                           enable_checkpointing=False)
    trainer.fit(module, make_loader())
    module.eval()
    x = probe()
    with torch.no_grad():
        merged = module(x)
    trainer.save_checkpoint(tmp_path / "after_merge.ckpt")
    layers = lora_layers(module.model)
    assert all(layer.merged for layer in layers.values())  # saving left the live module merged
    with torch.no_grad():
        torch.testing.assert_close(module(x), merged, rtol=0, atol=0)

    fresh = Classifier(seed=1)
    LoraCallback(conv_config()).inject(fresh)
    fresh.load_state_dict(torch.load(tmp_path / "after_merge.ckpt", weights_only=True)["state_dict"])
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), merged, rtol=0, atol=1e-5)
