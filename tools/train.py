"""Fine-tune a timm backbone with LoRA on few-shot data: ``python tools/train.py`` runs configs/default.yaml.

    python tools/train.py                                   # the offline default task
    python tools/train.py --model.lora.r 8                  # the same, overridden (no --config: configs/default.yaml)
    python tools/train.py --config configs/classification/vit_b16_lora.yaml --data.root /data/pets
    python tools/train.py --config configs/default.yaml --model.lora.r 16 --print_config
    python tools/train.py --config configs/default.yaml --ckpt_path last   # resume the newest run
    python tools/train.py --config configs/detection/default.yaml          # few-shot detection (a detector: key)
"""

import sys
from pathlib import Path

from visionlora.cli import command_line

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(arg == "--config" or arg.startswith("--config=") for arg in args):
        args = ["--config", str(DEFAULT_CONFIG), *args]  # no --config: the default config, flags override it
    sys.exit(command_line(args))
