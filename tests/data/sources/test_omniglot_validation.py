"""The Omniglot validation episodes and the pretraining sets that leave their alphabets out, on archives written
here: every image carries its alphabet, character and drawer as ink pixels in its first three rows."""

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from visionlora.data.sources import classification_source
from visionlora.data.sources.base import SourceOptions
from visionlora.data.sources.omniglot import (
    VALIDATION_ALPHABETS,
    omniglot_background_unique,
    rotated_classes,
)
from visionlora.data.sources.omniglot_episodes import omniglot_validation_episodes

# (split, alphabet, characters): Greek is in both splits with the same images, as in the real archives.
ALPHABETS = [("images_background_small1", "Balinese", 22), ("images_background_small1", "Early_Aramaic", 21),
             ("images_background_small1", "Greek", 3), ("images_background_small2", "Greek", 3),
             ("images_background_small2", "Tagalog", 4)]
CODES = {"Balinese": 0, "Early_Aramaic": 1, "Greek": 2, "Tagalog": 3}


def _png(alphabet: int, character: int, drawer: int) -> bytes:
    image = np.full((105, 105), 255, dtype=np.uint8)
    image[0, alphabet] = image[1, character] = image[2, drawer] = 0
    image[40:60, 40:60] = 0
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_background(folder):
    """Both background-small archives in the official layout: ``ALPHABETS``, 20 drawers per character."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("images_background_small1", "images_background_small2"):
        with zipfile.ZipFile(folder / f"{split}.zip", "w") as handle:
            for where, alphabet, count in ALPHABETS:
                for char in range(1, count + 1) if where == split else ():
                    for drawer in range(1, 21):
                        handle.writestr(f"{split}/{alphabet}/character{char:02d}/{char:04d}_{drawer:02d}.png",
                                        _png(CODES[alphabet], char, drawer))
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_background(tmp_path_factory.mktemp("omniglot"))


def _decode(images: np.ndarray) -> np.ndarray:
    """``[N, 3]``: (alphabet code, character, drawer) of each native-render image."""
    return np.stack([images[:, row, :, 0].argmax(axis=1) for row in range(3)], axis=1)


def test_episodes_are_within_alphabet_20_way_one_shot_across_two_drawers(root):
    episodes = omniglot_validation_episodes(root, episodes=4, seed=0, render="native")
    assert [e.run_id for e in episodes] == [0, 1, 2, 3]
    for episode in episodes:
        support, query = _decode(episode.train_images), _decode(episode.test_images)
        assert episode.train_labels.tolist() == list(range(20)) and sorted(episode.test_labels.tolist()) == list(
            range(20))
        expected = CODES[VALIDATION_ALPHABETS[episode.run_id % 2]]
        assert set(support[:, 0]) == set(query[:, 0]) == {expected}  # one alphabet, alternating
        assert len(set(support[:, 1])) == 20  # 20 distinct characters
        assert (query[:, 1] == support[episode.test_labels, 1]).all()  # each query is its label's character
        assert len(set(support[:, 2])) == len(set(query[:, 2])) == 1 and support[0, 2] != query[0, 2]


def test_episodes_are_deterministic_per_seed(root):
    first, again = (omniglot_validation_episodes(root, episodes=3, seed=5, render="native") for _ in range(2))
    other = omniglot_validation_episodes(root, episodes=3, seed=6, render="native")
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.train_images, b.train_images) and np.array_equal(a.test_labels, b.test_labels)
    assert any(not np.array_equal(_decode(a.train_images), _decode(c.train_images)) or
               not np.array_equal(a.test_labels, c.test_labels) for a, c in zip(first, other, strict=True))


def test_an_alphabet_too_small_for_20_ways_is_named(root):
    with pytest.raises(ValueError, match="'Tagalog' has 4 characters"):
        omniglot_validation_episodes(root, episodes=1, alphabets=("Tagalog",))


def test_held_out_alphabets_never_reach_the_dev_pretraining_set(root):
    for part, drawers in (("train", set(range(1, 17))), ("test", set(range(17, 21)))):
        images, labels, names, files = omniglot_background_unique(root, part, "native",
                                                                  exclude_alphabets=VALIDATION_ALPHABETS)
        decoded = _decode(images)
        assert len(names) == 3 + 4 and labels.max() == 6 and len(images) == 7 * len(drawers)
        assert not set(decoded[:, 0]) & {CODES[a] for a in VALIDATION_ALPHABETS}
        assert set(decoded[:, 2]) == drawers and all(a not in n for n in names for a in VALIDATION_ALPHABETS)
    dev = classification_source("omniglot-dev")
    listed = dev.list_classes(SourceOptions(root=str(root)))
    assert listed == dev.read(SourceOptions(root=str(root))).class_names == names


def test_characters_in_both_splits_are_kept_once(root):
    images, labels, names, _ = omniglot_background_unique(root, "train", "native")
    assert len(names) == 22 + 21 + 3 + 4 and len(images) == 50 * 16  # Greek's second copy dropped
    assert [n for n in names if "Greek" in n] == [f"images_background_small1/Greek/character{c:02d}" for c in (1, 2, 3)]
    assert classification_source("omniglot-unique").list_classes(SourceOptions(root=str(root))) == names


def test_rotated_classes_turn_every_character_into_four_classes():
    images = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3)
    labels, names, files = np.array([1, 0]), ["a", "b"], ["a.png", "b.png"]
    turned, turned_labels, turned_names, turned_files = rotated_classes(images, labels, names, files, 4)
    assert turned.shape == (8, 3, 3, 3) and turned.flags.c_contiguous
    assert turned_labels.tolist() == [1, 0, 3, 2, 5, 4, 7, 6]
    assert turned_names == ["a", "b", "a@rot90", "b@rot90", "a@rot180", "b@rot180", "a@rot270", "b@rot270"]
    assert turned_files[2:4] == ["a.png@rot90", "b.png@rot90"]
    for k in range(4):  # block k is the originals turned k quarter turns counter-clockwise, channels untouched
        np.testing.assert_array_equal(turned[2 * k:2 * k + 2], np.rot90(images, k, axes=(1, 2)))
    np.testing.assert_array_equal(turned[2, :, :, 1], np.rot90(images[0, :, :, 1]))
    assert rotated_classes(images, labels, names, files, 1)[2] == names


@pytest.mark.parametrize("turns", [0, 5])
def test_rotated_classes_refuse_a_turn_count_outside_one_to_four(turns):
    with pytest.raises(ValueError, match="quarter_turns must be 1-4, got " + str(turns)):
        rotated_classes(np.zeros((1, 2, 2, 3), np.uint8), np.zeros(1, int), ["a"], ["a.png"], turns)


def test_the_rot4_dev_source_lists_what_it_reads_and_holds_the_turned_images(root):
    options = SourceOptions(root=str(root))
    dev, rot4 = classification_source("omniglot-dev").read(options), classification_source("omniglot-dev-rot4")
    pools = rot4.read(options)
    count = len(dev.class_names)
    assert rot4.list_classes(options) == pools.class_names and len(pools.class_names) == 4 * count == 28
    assert pools.class_names[count] == dev.class_names[0] + "@rot90"
    for split, base in ((pools.train, dev.train), (pools.test, dev.test)):
        assert len(split) == 4 * len(base) and split.labels[len(base):2 * len(base)].tolist() == (
            base.labels + count).tolist()
        np.testing.assert_array_equal(split.images[3 * len(base):], np.rot90(base.images, 3, axes=(1, 2)))
    assert len(classification_source("omniglot-unique-rot4").list_classes(options)) == 4 * (22 + 21 + 3 + 4)
