"""Pretrain a small backbone on offline data and bundle it under data/weights/ with a model card.

    python tools/pretrain.py --config configs/pretrain/vit_digits.yaml
    python tools/pretrain.py --config configs/pretrain/resnet_digits.yaml
"""

import sys

from visionlora.cli import command_line

if __name__ == "__main__":
    if not any(arg.startswith("--config") for arg in sys.argv[1:]):
        print("error: --config is required: python tools/pretrain.py --config configs/pretrain/<name>.yaml "
              "[overrides]", file=sys.stderr)
        sys.exit(2)
    sys.exit(command_line())
