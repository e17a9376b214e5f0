"""Run by tests/test_classification.py: 2-process DDP on CPU (gloo) through Lightning's own strategy.

Each rank writes its LoRA tensors and its logged metrics to <out>/rank<R>.pt so the test can compare them.
"""

import sys

import lightning as L
import torch

from visionlora import LoraConfig
from visionlora.data import FewShotDataModule
from visionlora.tasks import LoraClassifier

TINY_VIT = {"img_size": 24, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}


def main(out: str) -> None:
    L.seed_everything(0)
    data = FewShotDataModule(dataset="digits", shots=4, batch_size=4, image_size=24, val_fraction=0.1)
    model = LoraClassifier(backbone="vit_tiny_patch16_224", model_args=TINY_VIT, num_classes=data.num_classes,
                           lora=LoraConfig(r=2, targets=["vit-all"]))
    trainer = L.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=2)
    trainer.fit(model, datamodule=data)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    torch.save({"lora": lora, "metrics": metrics, "world_size": trainer.world_size},
               f"{out}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
