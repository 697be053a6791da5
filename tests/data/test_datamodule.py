"""ChameleonDataModule options on the shapes source: caption targets, category weights, packing advice."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter

import numpy as np
import pytest
import torch

from chameleon_lite.config import ConfigError, compose_config
from chameleon_lite.data.datamodule import ChameleonDataModule, cache_documents, caption_targets
from chameleon_lite.data.shapes import CATEGORIES, ShapesWorld, canonical_caption, parse_caption
from chameleon_lite.data.shapes_scene import Relation, relation_holds
from chameleon_lite.data.token_cache import TokenCache


def test_canonical_target_rewrites_captioning_documents_only(tiny_train_cfg):
    cfg = tiny_train_cfg("data.n_train=64", "data.caption_target=canonical")
    dm = ChameleonDataModule(cfg.data, cfg.tokenizer.dir)
    tok = dm.load_tokenizer()
    cache, _ = dm._caches(tok)
    builder = tok.builder(cfg.data.loss_on)
    targets = caption_targets(cache, "canonical")
    assert targets == [canonical_caption(parse_caption(t)) for t in cache.texts]
    assert targets != list(cache.texts)  # the generator's phrasings vary; the targets do not
    docs = cache_documents(cache, builder, {"t2i": 0.5, "caption": 0.5}, seed=0, epoch=0, captions=targets)
    as_is = cache_documents(cache, builder, {"t2i": 0.5, "caption": 0.5}, seed=0, epoch=0)
    expected_t2i = {tuple(builder.text_to_image(t, c).input_ids) for t, c in zip(cache.texts, cache.codes)}
    expected_caption = {tuple(builder.image_to_text(c, t).input_ids) for t, c in zip(targets, cache.codes)}
    kinds = [tuple(d.input_ids) in expected_t2i for d in docs]
    assert 0 < sum(kinds) < len(docs)  # both tasks drawn
    for doc, other, is_t2i in zip(docs, as_is, kinds):
        assert tuple(doc.input_ids) in (expected_t2i if is_t2i else expected_caption)
        if is_t2i:  # same task draw: text-to-image documents are untouched
            np.testing.assert_array_equal(doc.input_ids, other.input_ids)
    dm.setup("fit")  # the packed training set is built from the same targets
    assert dm.train_set.stats[0].documents == 64


def test_an_uncond_share_of_the_pairs_trains_images_alone_under_completion(tiny_train_cfg):
    """data.tasks.uncond=0.1 (t2i and caption 0.45 each) with loss_on=completion: about a tenth of the documents
    are images alone, whose codes carry the loss (CFG's unconditional model); the caption documents' images do not."""
    cfg = tiny_train_cfg("data.n_train=200", "data.loss_on=completion", "data.tasks.t2i=0.45", "data.tasks.caption=0.45",
                         "data.tasks.uncond=0.1")
    dm = ChameleonDataModule(cfg.data, cfg.tokenizer.dir)
    tok = dm.load_tokenizer()
    cache, _ = dm._caches(tok)
    builder = tok.builder("completion")
    docs = cache_documents(cache, builder, dict(cfg.data.tasks), seed=0, epoch=0)
    alone = {tuple(builder.pair_document("uncond", "", c).input_ids) for c in cache.codes}
    uncond = [d for d in docs if tuple(d.input_ids) in alone]
    assert 8 <= len(uncond) <= 35  # ~20 of 200
    assert all(d.loss_mask[1:-1].all() for d in uncond)
    with pytest.raises(ConfigError, match="data.tasks=.*among \\('t2i', 'caption', 'uncond'\\)"):
        cache_documents(cache, builder, {"t2i": 1, "edit": 1}, seed=0, epoch=0)


def test_relation_target_says_where_two_objects_are(tiny_train_cfg):
    """caption_target=relation: captions of two different single objects state a relation that holds
    between the drawn objects; other captions, and the text-to-image prompts, stay as they are."""
    cfg = tiny_train_cfg("data.n_train=64", "data.n_val=16", "data.caption_target=relation")
    dm = ChameleonDataModule(cfg.data, cfg.tokenizer.dir)
    train, val = dm._caches(dm.load_tokenizer())
    world = ShapesWorld(seed=cfg.data.seed, image_size=cfg.data.image_size, split="train", length=64,
                        holdout_pairs=tuple(tuple(p) for p in cfg.data.holdout_pairs))
    targets = caption_targets(train, "relation")
    rewritten = 0
    for i, (text, target) in enumerate(zip(train.texts, targets)):
        sample = world[i]
        assert text == sample.caption  # prompts untouched
        spec, truth = parse_caption(target), sample.spec
        assert spec.objects == truth.objects
        if target != text:
            rewritten += 1
            assert truth.relation is None and spec.relation is not None
            assert relation_holds(sample.objects, spec.relation)
        elif truth.relation is None and truth.num_objects == 2 and len(truth.objects) == 2:
            assert not any(relation_holds(sample.objects, Relation(a.key, r, b.key))
                           for a, b in (truth.objects, truth.objects[::-1]) for r in ("left of", "above"))
    assert rewritten > 5
    assert len(caption_targets(val, "relation")) == 16
    with pytest.raises(ConfigError, match="relation captions"):
        caption_targets(TokenCache(train.codes, train.texts, [{} for _ in train.meta]), "relation")


def test_the_token_cache_follows_the_world_layout(tiny_train_cfg):
    """data.layout picks the shapes world's layouts (and is part of the cache key): each cache holds
    exactly its world's captions, and the two layouts' caches differ."""
    texts = {}
    for layout in ("unambiguous", "free"):
        cfg = tiny_train_cfg("data.n_train=32", "data.n_val=8", f"data.layout={layout}")
        dm = ChameleonDataModule(cfg.data, cfg.tokenizer.dir)
        train, _ = dm._caches(dm.load_tokenizer())
        world = ShapesWorld(seed=cfg.data.seed, image_size=cfg.data.image_size, split="train", length=32,
                            holdout_pairs=tuple(tuple(p) for p in cfg.data.holdout_pairs), layout=layout)
        assert train.texts == [world[i].caption for i in range(32)]
        texts[layout] = train.texts
    assert texts["unambiguous"] != texts["free"]


@pytest.mark.parametrize("override, match", [
    ("data.caption_target=verbatim", "data.caption_target='verbatim' is invalid"),
])
def test_bad_caption_target_is_a_config_error(tiny_train_cfg, override, match):
    cfg = tiny_train_cfg(override)
    with pytest.raises(ConfigError, match=match):
        ChameleonDataModule(cfg.data, cfg.tokenizer.dir)


def test_canonical_target_needs_shapes_captions(tmp_path):
    cfg = compose_config("train", ["data=jsonl", f"data.train_path={tmp_path / 't.jsonl'}",
                                   "+data.caption_target=canonical"])
    with pytest.raises(ConfigError, match="free-text captions: use data.caption_target=as_is"):
        ChameleonDataModule(cfg.data, cfg.tokenizer.dir)


def test_val_pairs_reach_the_val_cache_only(tiny_train_cfg):
    """data.val_holdout_pairs (part of the cache key): the val cache shows the val pair, flagged held-out
    in its meta, the train cache never does; [] gives the world without val pairs."""
    caches = {}
    for pairs in ("[[green,circle]]", "[]"):
        cfg = tiny_train_cfg("data.n_train=200", "data.n_val=64", f"data.val_holdout_pairs={pairs}")
        dm = ChameleonDataModule(cfg.data, cfg.tokenizer.dir)
        caches[pairs] = dm._caches(dm.load_tokenizer())
        world = ShapesWorld(seed=cfg.data.seed, image_size=cfg.data.image_size, split="val", length=64,
                            holdout_pairs=tuple(tuple(p) for p in cfg.data.holdout_pairs),
                            val_holdout_pairs=tuple(tuple(p) for p in cfg.data.val_holdout_pairs))
        assert caches[pairs][1].texts == [world[i].caption for i in range(64)]
    (train, val), (bare_train, bare_val) = caches["[[green,circle]]"], caches["[]"]
    assert not any("green circle" in t for t in train.texts) and any("green circle" in t for t in bare_train.texts)
    flagged = [m["heldout"] for m in val.meta]
    assert 0 < sum(flagged) < len(flagged) and not any(m["heldout"] for m in bare_val.meta)
    assert all(("green circle" in t) == f for t, f in zip(val.texts, flagged) if "green circles" not in t)


def test_category_weights_shape_the_training_cache_only(tiny_train_cfg):
    cfg = tiny_train_cfg("data.n_train=96", "data.n_val=24", "data.category_weights={position: 6, counting: 0}")
    dm = ChameleonDataModule(cfg.data, cfg.tokenizer.dir)
    train, val = dm._caches(dm.load_tokenizer())
    train_categories = Counter(m["category"] for m in train.meta)
    # named categories get their weight, unnamed ones keep 1.0, 0 drops one: 6/11 position, no counting
    assert set(train_categories) == set(CATEGORIES) - {"counting"}
    assert train_categories["position"] > sum(train_categories.values()) / 3
    assert len({m["category"] for m in val.meta}) > 3  # val keeps every category: comparable val losses
    bad = tiny_train_cfg("data.category_weights={positions: 1}")
    with pytest.raises(ConfigError, match=r"data.category_weights names unknown categories \['positions'\]"):
        ChameleonDataModule(bad.data, bad.tokenizer.dir)  # at construction, before any cache is built


def test_loose_packing_is_logged_with_a_tighter_row_length(tiny_train_cfg, caplog):
    cfg = tiny_train_cfg("data.n_train=64", "data.seq_len=160")  # 73-104-token documents: 1 per row, ~55% real
    dm = ChameleonDataModule(cfg.data, cfg.tokenizer.dir)
    with caplog.at_level(logging.WARNING, logger="chameleon_lite.data.datamodule"):
        dm.setup("fit")
    warning = next(r.getMessage() for r in caplog.records if "only" in r.getMessage())
    suggested = int(re.search(r"\(e\.g\. (\d+)\)", warning).group(1))
    assert "data.seq_len=160" in warning and 160 < suggested <= 200
    tighter = ChameleonDataModule(tiny_train_cfg("data.n_train=64", f"data.seq_len={suggested}").data, cfg.tokenizer.dir)
    tighter.setup("fit")
    assert tighter.train_set.stats[0].real_fraction > max(0.9, dm.train_set.stats[0].real_fraction)


def test_the_shapes_token_cache_follows_the_vq_config_and_refuses_a_damaged_file(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    from chameleon_lite.config import repo_path
    from chameleon_lite.data.token_cache import load_or_build_shapes_cache
    from chameleon_lite.vq.api import ImageTokenizer

    vq_dir = repo_path("tokenizers/shapes")
    tok = ImageTokenizer.from_pretrained(vq_dir)
    build = {"seed": 0, "split": "val", "n": 8, "image_size": 64, "holdout_pairs": [["red", "triangle"]],
             "batch_size": 8}
    first = load_or_build_shapes_cache(tmp_path, vq_dir, tok, **build)
    (path,) = tmp_path.glob("*.safetensors")
    # the same weights under another vq.yaml (here l2_normalize flipped) may code otherwise: another key
    other = ImageTokenizer.from_pretrained(vq_dir)
    other.config = dataclasses.replace(tok.config, l2_normalize=not tok.config.l2_normalize)
    load_or_build_shapes_cache(tmp_path, vq_dir, other, **build)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    # a cache file whose codes are out of the codebook (e.g. written by an older int16 bug) is re-encoded
    save_file({"codes": load_file(str(path))["codes"] * 0 - 5}, str(path))
    with caplog.at_level(logging.WARNING):
        again = load_or_build_shapes_cache(tmp_path, vq_dir, tok, **build)
    assert "re-encoding" in caplog.text and torch.equal(again.codes, first.codes)
