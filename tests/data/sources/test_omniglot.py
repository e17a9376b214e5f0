"""Omniglot archive reading and the digits-style rendering, on a tiny archive written here."""

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from visionlora.data import FewShotDataModule
from visionlora.data.sources.omniglot import (
    digits_with_omniglot,
    omniglot_background,
    omniglot_background_class_names,
    render_like_digits,
)
from visionlora.data.sources.omniglot_episodes import omniglot_one_shot_runs


def _png(ink_box: tuple[int, int, int, int]) -> bytes:
    image = np.full((105, 105), 255, dtype=np.uint8)
    top, left, bottom, right = ink_box
    image[top:bottom, left:right] = 0  # black ink on white, as in Omniglot
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def archive_root(tmp_path):
    with zipfile.ZipFile(tmp_path / "images_background_small1.zip", "w") as handle:
        for char in (1, 2):
            for drawer in (1, 2, 3):
                handle.writestr(f"images_background_small1/Alpha/character0{char}/x_{drawer}.png",
                                _png((10, 10, 50, 50 + 10 * char)))
    return tmp_path


def test_render_like_digits_counts_ink_in_4x4_blocks():
    ink = np.zeros((40, 40), dtype=bool)
    ink[:, 10:30] = True  # a 40x20 bar: centred in a square, it covers the middle half of the columns
    rendered = render_like_digits(ink)
    assert rendered.shape == (8, 8) and rendered.max() == 16 and rendered.min() == 0
    assert (rendered[:, 2:6] == 16).all() and (rendered[:, :2] == 0).all() and (rendered[:, 6:] == 0).all()
    assert render_like_digits(np.zeros((5, 5), dtype=bool)).sum() == 0


def test_background_reads_classes_and_renders(archive_root):
    images, labels, names = omniglot_background(archive_root, splits=("images_background_small1",))
    assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8
    assert names == ["images_background_small1/Alpha/character01", "images_background_small1/Alpha/character02"]
    assert labels.tolist() == [0, 0, 0, 1, 1, 1] and images.max() == 255
    native, _, _ = omniglot_background(archive_root, splits=("images_background_small1",), render="native")
    assert native.shape == (6, 105, 105, 3)


def test_missing_archive_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="images_background_small2"):
        omniglot_background(tmp_path, splits=("images_background_small2",))


def test_digits_with_omniglot_appends_classes_after_the_digits(archive_root, monkeypatch):
    import visionlora.data.sources.omniglot as omniglot

    monkeypatch.setattr(omniglot, "BACKGROUND_SMALL", ("images_background_small1",))
    omniglot._cached_background.cache_clear()
    monkeypatch.setattr(omniglot, "_cached_background",
                        lambda root: omniglot_background(root, splits=("images_background_small1",)))
    images, labels, names = digits_with_omniglot(archive_root, "base", "train")
    test_images, test_labels, test_names = digits_with_omniglot(archive_root, "base", "test")
    assert names[:5] == ["0", "1", "2", "3", "4"] and len(names) == 7 and test_names == names
    assert (labels >= 5).sum() == 6 and set(labels[labels >= 5].tolist()) == {5, 6}
    assert test_labels.max() <= 4 and len(test_images) > 0


def test_missing_archives_name_every_expected_file_and_where_they_come_from(archive_root, tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        omniglot_background_class_names(archive_root)  # small1 is there, small2 is not
    message = str(caught.value)
    assert "needs images_background_small1.zip and images_background_small2.zip" in message
    assert f"not found: {archive_root / 'images_background_small2.zip'} (nor the folder" in message
    assert "small1.zip (nor" not in message
    assert "official Omniglot repository (brendenlake/omniglot on GitHub, folder python/" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"one-shot runs need all_runs\.zip .*brendenlake/omniglot.*python/"):
        omniglot_one_shot_runs(empty)
    with pytest.raises(FileNotFoundError, match=r"images_background_small1\.zip and images_background_small2\.zip"):
        FewShotDataModule(dataset="omniglot", root=str(empty))
