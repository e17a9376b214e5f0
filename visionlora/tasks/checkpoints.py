"""What every task's Lightning checkpoint records besides weights: where the run was started.

Configs name files relative to the working directory (``pretrained_file: local-dir:data/weights/...``,
``base_detector``, data roots). A checkpoint records that directory, so an export or a prediction started from
anywhere else resolves those paths as the run did.
"""

from __future__ import annotations

import os

WORKING_DIRECTORY_KEY = "visionlora_working_directory"
# Hyperparameters holding paths (``local-dir:`` prefix allowed), of the task modules and of the data modules.
MODULE_PATH_FIELDS = ("pretrained_file", "base_detector")
DATA_PATH_FIELDS = ("root", "train_annotations", "train_images", "val_annotations", "val_images",
                    "test_annotations", "test_images")


def record_working_directory(checkpoint: dict) -> None:
    """Store the process's working directory in ``checkpoint`` (called from ``on_save_checkpoint``)."""
    checkpoint[WORKING_DIRECTORY_KEY] = os.getcwd()
