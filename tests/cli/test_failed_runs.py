"""What a failed run leaves behind: no run directory when it fails before training, no stray temporary files."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from visionlora.cli import main

from .conftest import fast_args, run_dirs


@pytest.mark.parametrize("bad", [["--model.method", "bogus"], ["--data.shots", "0"]], ids=["model", "data"])
def test_a_run_that_fails_while_building_leaves_no_run_directory(tmp_path, bad):
    with pytest.raises(ValueError):
        main(fast_args(tmp_path, *bad))
    assert run_dirs(tmp_path) == []


def test_a_run_that_fails_in_data_setup_leaves_no_run_directory(tmp_path):
    """More shots than digits has per class: found when the shots are drawn, after the run directory was made."""
    with pytest.raises(ValueError, match="fewer than k=1000 images"):
        main(fast_args(tmp_path, "--data.shots", "1000"))
    assert run_dirs(tmp_path) == []


@pytest.fixture
def private_tmpdir(tmp_path, monkeypatch) -> Path:
    """``tempfile``'s folder (what $TMPDIR sets) pointed at an empty folder of the test's own."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_checkpoints_are_staged_beside_their_target_not_in_tmpdir(tmp_path, private_tmpdir, monkeypatch):
    """A kill between writing and renaming must leave nothing in $TMPDIR: the temporary file sits beside the target.

    Every rename that puts a checkpoint in place is recorded, with what $TMPDIR held at that moment.
    """
    moves = []
    real_replace, real_move = os.replace, shutil.move

    def recording(real):
        def rename(source, target, *args, **kwargs):
            if str(target).endswith(".ckpt"):
                moves.append((Path(source), Path(target), sorted(private_tmpdir.iterdir())))
            return real(source, target, *args, **kwargs)
        return rename

    monkeypatch.setattr(os, "replace", recording(real_replace))
    monkeypatch.setattr(shutil, "move", recording(real_move))
    main(fast_args(tmp_path / "runs"))
    (run_dir,) = run_dirs(tmp_path / "runs")
    assert [target for _, target, _ in moves] == [run_dir / "checkpoints" / "last.ckpt"]
    for source, target, in_tmpdir in moves:
        assert source.parent == target.parent and in_tmpdir == []
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]


def test_a_failing_checkpoint_save_leaves_no_stray_file(tmp_path, private_tmpdir, monkeypatch):
    """Putting the checkpoint in place fails (the disk is full): the error surfaces, and no file stays anywhere."""

    def failing(real):
        def rename(source, target, *args, **kwargs):
            if str(target).endswith(".ckpt"):
                raise OSError(28, "No space left on device")
            return real(source, target, *args, **kwargs)
        return rename

    monkeypatch.setattr(os, "replace", failing(os.replace))
    monkeypatch.setattr(shutil, "move", failing(shutil.move))
    with pytest.raises(OSError, match="No space left"):
        main(fast_args(tmp_path / "runs"))
    assert list(private_tmpdir.iterdir()) == []
    leftovers = [p.name for p in (tmp_path / "runs").rglob("*") if ".tmp" in p.name or p.suffix == ".ckpt"]
    assert leftovers == []
