"""visionlora.files: atomic writes leave the old content or the new, never a part, and follow the user's umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from visionlora.files import atomic_write, staged_folder, write_json_atomic, write_text_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_and_folders_follow_the_umask(tmp_path, umask_022):
    assert mode(write_text_atomic(tmp_path / "a.txt", "x")) == 0o644
    assert mode(write_json_atomic(tmp_path / "sub" / "b.json", {"k": 1})) == 0o644
    with staged_folder(tmp_path / "folder") as staging:
        (staging / "weights").write_bytes(b"w")
    assert mode(tmp_path / "folder") == 0o755 and mode(tmp_path / "folder" / "weights") == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = write_text_atomic(tmp_path / "a.txt", "old")

    def fail(temporary: str) -> None:
        Path(temporary).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_failed_folder_leaves_nothing_and_an_existing_one_needs_replace(tmp_path):
    with pytest.raises(RuntimeError), staged_folder(tmp_path / "out") as staging:
        (staging / "part").write_text("x")
        raise RuntimeError("check failed")
    assert list(tmp_path.iterdir()) == []
    with staged_folder(tmp_path / "out") as staging:
        (staging / "v1").write_text("1")
    with pytest.raises(FileExistsError), staged_folder(tmp_path / "out") as staging:
        (staging / "v2").write_text("2")
    with staged_folder(tmp_path / "out", replace=True) as staging:
        (staging / "v2").write_text("2")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["v2"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_merged_export_is_readable_by_others_under_umask_022(tmp_path, umask_022):
    import timm

    from visionlora import LoraConfig, inject_lora
    from visionlora.export import ExportSource, export_merged

    model = timm.create_model("test_resnet", num_classes=3).eval()
    inject_lora(model, LoraConfig(r=2, targets=["conv"]))
    export_merged(ExportSource(model, "test_resnet", data_config={"input_size": (3, 32, 32)}), tmp_path / "out")
    assert mode(tmp_path / "out") == 0o755
    assert {p.name: mode(p) for p in (tmp_path / "out").iterdir()} == {
        "config.json": 0o644, "model.safetensors": 0o644, "export_report.json": 0o644}
