"""Fine-tune a timm backbone with LoRA on few-shot data: ``python tools/train.py`` runs configs/default.yaml.

    python tools/train.py                                   # the offline default task
    python tools/train.py --config configs/classification/vit_b16_lora.yaml --data.root /data/pets
    python tools/train.py --config configs/default.yaml --model.lora.r 16 --print_config
    python tools/train.py --config configs/default.yaml --ckpt_path last   # resume the newest run
    python tools/train.py --config configs/detection/default.yaml          # few-shot detection (a detector: key)
"""

import sys
from pathlib import Path

from visionlora.cli import main

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"

if __name__ == "__main__":
    # Arguments given: LightningCLI reads them from sys.argv itself; none: run the default config.
    main(None if sys.argv[1:] else ["--config", str(DEFAULT_CONFIG)])
