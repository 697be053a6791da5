"""data.recolour: the tokenizer's shapes images with their palette colours swapped (session 24)."""

import pytest
import torch

from chameleon_lite.config import ConfigError
from chameleon_lite.data.shapes import ShapesWorld
from chameleon_lite.data.shapes_detect import detect_objects
from chameleon_lite.data.shapes_scene import COLOURS
from chameleon_lite.vq.data import ShapesImages, VQDataModule, recolour

NAMES = list(COLOURS)


def test_recolouring_repaints_each_object_in_its_permuted_colour_and_keeps_its_shape_and_place():
    world = ShapesWorld(seed=0, image_size=64, split="train", length=20)
    shift = [(i + 1) % len(NAMES) for i in range(len(NAMES))]  # red -> green -> blue -> ... -> orange -> red
    for index in range(20):
        sample = world[index]
        before = sorted((d.shape, d.colour, d.bbox) for d in detect_objects(sample.image))
        after = sorted((d.shape, d.colour, d.bbox) for d in detect_objects(recolour(sample.image, shift)))
        expected = sorted((shape, NAMES[shift[NAMES.index(colour)]], bbox) for shape, colour, bbox in before)
        assert after == expected
        background = (sample.image == 255).all(dim=0)
        assert torch.equal(recolour(sample.image, shift)[:, background], sample.image[:, background])


def test_the_identity_permutation_changes_nothing_and_a_wrong_one_is_refused():
    image = ShapesWorld(seed=0, image_size=32, split="train", length=1)[0].image
    assert torch.equal(recolour(image, list(range(len(NAMES)))), image)
    with pytest.raises(ValueError, match="permutation must order all 6 palette colours"):
        recolour(image, [0, 0, 1, 2, 3, 4])


def test_recoloured_training_images_are_deterministic_and_show_the_pairs_the_split_holds_out():
    plain = ShapesImages(seed=0, image_size=64, split="train", length=400)
    recoloured = ShapesImages(seed=0, image_size=64, split="train", length=400, recolour=True)
    again = ShapesImages(seed=0, image_size=64, split="train", length=400, recolour=True)
    held_out = {(pair.colour, pair.shape) for pair in plain.world.holdout_pairs | plain.world.val_holdout_pairs}
    assert held_out
    seen_plain, seen_recoloured, changed = set(), set(), 0
    for index in range(400):
        image = recoloured[index]
        assert torch.equal(image, again[index])
        changed += not torch.equal(image, plain[index])
        seen_plain |= {(d.colour, d.shape) for d in detect_objects(plain[index])}
        seen_recoloured |= {(d.colour, d.shape) for d in detect_objects(image)}
    assert not seen_plain & held_out  # the train split never draws them ...
    assert held_out <= seen_recoloured  # ... its recoloured images do
    assert changed > 350  # 1 in 720 permutations is the identity (and single-colour scenes may map to themselves)


def test_the_datamodule_recolours_training_images_only_and_refuses_user_images(tmp_path):
    data = VQDataModule(image_size=32, batch_size=2, recolour=True, train_length=8, val_length=4)
    data.setup("fit")
    assert data.train_set.recolour and not data.val_set.recolour
    with pytest.raises(ConfigError, match="data.recolour=true swaps the shapes world's palette"):
        VQDataModule(image_size=32, folder=str(tmp_path), recolour=True)
