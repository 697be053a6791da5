"""A corpus of bad inputs, generated here: each is a counted skip (reason -> count in ``datamodule.skipped``)
or, with ``data.strict=true``, an error naming file:line and the fix; training on the corpus completes
and reports the skips at every epoch end. Also: bad code stores, out-of-range ids, bad overrides and a
checkpoint trained with other tokenizers.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from hydra.errors import ConfigCompositionException
from PIL import Image
from reliability_helpers import (
    RELIABILITY_TRAIN,
    build_tiny_tokenizer,
    logged_series,
    shared_dir,
    torch_threads,
    train_overrides,
)
from safetensors import safe_open
from safetensors.torch import save_file

from chameleon_lite.cli.train import train
from chameleon_lite.config import ConfigError
from chameleon_lite.data import records
from chameleon_lite.data.datamodule import ChameleonDataModule
from chameleon_lite.data.jsonl import JsonlCacheError, JsonlRecordError
from chameleon_lite.data.packing import REASON_NO_LOSS
from chameleon_lite.data.sequences import IGNORE_INDEX
from chameleon_lite.train.module import ChameleonLightningModule
from chameleon_lite.vocab import UnifiedVocab, VocabError, VocabMismatchError

MAX_PIXELS = 5000  # the 40x48 good images pass, the 100x100 one is "too large"


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "JPEG")
    return out.getvalue()


def write_images(folder: Path) -> None:
    """Good images in every mode load_image converts, and every kind of broken one."""
    rng = np.random.default_rng(0)
    rgb = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(5)]
    good_png, good_jpg = _png(rgb[0]), _jpeg(rgb[0])
    scan = good_jpg.index(b"\xff\xda") + 20  # headers intact, entropy-coded data garbled
    files = {f"good{i}.png": _png(a) for i, a in enumerate(rgb[:4])} | {
        "good.jpg": _jpeg(rgb[4]),
        "corrupt.png": good_png[:60] + rng.integers(0, 256, len(good_png) - 60, dtype=np.uint8).tobytes(),
        "truncated.png": good_png[: len(good_png) // 2],
        "corrupt_header.jpg": b"\x00\x11" + good_jpg[2:],
        "corrupt.jpg": good_jpg[:scan] + rng.integers(0, 256, len(good_jpg) - scan, dtype=np.uint8).tobytes(),
        "truncated.jpg": good_jpg[: len(good_jpg) // 2],
        "empty.png": b"",
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    Image.fromarray(rng.integers(0, 256, (40, 48, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb[1]).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb[2][..., 0]).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 65536, (40, 48)).astype(np.uint16)).save(folder / "sixteen.png")
    Image.fromarray(rgb[3][:1, :1]).save(folder / "one_pixel.png")
    Image.fromarray(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)).save(folder / "too_large.png")


def pair(image: str, text: str) -> bytes:
    return json.dumps({"image": f"img/{image}", "text": text}).encode()


def doc(*segments: dict) -> bytes:
    return json.dumps({"segments": list(segments)}).encode()


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(name: str) -> dict:
    return {"type": "image", "path": f"img/{name}"}


GOOD = [pair("good0.png", "a red circle"), pair("good1.png", "a blue square"), pair("good2.png", "two dots"),
        pair("good3.png", "a green line"), pair("good.jpg", "a jpeg"), pair("rgba.png", "transparent"),
        pair("cmyk.jpg", "printed"), pair("gray.png", "gray"), pair("sixteen.png", "sixteen bits"),
        doc(text("first"), image("good0.png"), text("then"), image("good1.png"))]

#: (case id, JSONL line, skip reason)
BAD = [
    ("corrupt_png", pair("corrupt.png", "x"), "image data corrupt or truncated"),
    ("truncated_png", pair("truncated.png", "x"), "image data corrupt or truncated"),
    ("corrupt_jpeg", pair("corrupt.jpg", "x"), "image data corrupt or truncated"),
    ("corrupt_jpeg_header", pair("corrupt_header.jpg", "x"), "not a readable image file"),
    ("truncated_jpeg", pair("truncated.jpg", "x"), "image data corrupt or truncated"),
    ("zero_bytes", pair("empty.png", "x"), "image file is empty (0 bytes)"),
    ("one_pixel", pair("one_pixel.png", "x"), "image below data.min_side"),
    ("above_pixel_budget", pair("too_large.png", "x"), "image above data.max_pixels"),
    ("missing_image", pair("nowhere.png", "x"), "image file missing"),
    ("missing_image_in_document", doc(text("see"), image("nowhere.png")), "image file missing"),
    ("latin1_caption", b'{"image": "img/good0.png", "text": "caf\xe9"}', "text is not valid UTF-8"),
    ("lone_surrogate", b'{"image": "img/good0.png", "text": "bad \\ud800 escape"}', "text is not valid UTF-8"),
    ("empty_caption", pair("good0.png", ""), "empty text"),
    ("blank_caption", pair("good0.png", "   "), "empty text"),
    ("malformed_json", b'{"image": "img/good0.png", "text": ', "malformed JSON line"),
    ("not_an_object", b"[1, 2]", records.REASON_BAD_RECORD),
    ("no_text", json.dumps({"image": "img/good0.png"}).encode(), records.REASON_BAD_RECORD),
    ("image_segment_without_path", doc(text("a"), {"type": "image"}), records.REASON_BAD_RECORD),
    ("unknown_segment_type", doc(text("a"), {"type": "video", "path": "clip.mp4"}), "unknown segment type"),
    ("longer_than_seq_len", doc(*(image(f"good{i}.png") for i in range(4))),
     "document longer than seq_len (data.overflow=reject)"),
]


def write_corpus(folder: Path, lines: list[bytes]) -> Path:
    if not (folder / "img").is_dir():
        write_images(folder / "img")
    path = folder / "train.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def jsonl_overrides(basetemp: Path, run_dir: Path, train_path: Path, *extra: str) -> list[str]:
    """RELIABILITY_TRAIN on ``data=jsonl`` (its shapes-only keys dropped)."""
    shapes_only = ("data.n_train=", "data.n_val=", "data.image_size=")
    tok = build_tiny_tokenizer(shared_dir(basetemp, "tokenizer"))
    return [*(o for o in RELIABILITY_TRAIN if not o.startswith(shapes_only)), "data=jsonl",
            f"data.train_path={train_path}", "data.seq_len=64", f"data.max_pixels={MAX_PIXELS}",
            "data.overflow=reject", f"tokenizer.dir={tok}", f"data.cache_dir={shared_dir(basetemp, 'cache')}",
            f"run_dir={run_dir}", *extra]


def datamodule(basetemp: Path, train_path: Path, *extra: str) -> ChameleonDataModule:
    cfg = compose_config("train", jsonl_overrides(basetemp, basetemp / "unused", train_path, *extra))
    dm = ChameleonDataModule(cfg.data, cfg.tokenizer.dir)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    lines = [GOOD[0], b"", *(line for _, line, _ in BAD), *GOOD[1:]]  # a blank line is not a record
    return write_corpus(tmp_path_factory.mktemp("corpus"), lines)


#: case id -> what the warning logged for its record says (the detail behind the counted reason)
LOGGED = {
    "corrupt_png": "image data is corrupt or truncated", "truncated_png": "image data is corrupt or truncated",
    "corrupt_jpeg": "image data is corrupt or truncated", "corrupt_jpeg_header": "not a readable image",
    "truncated_jpeg": "image data is corrupt or truncated", "zero_bytes": "file is empty (0 bytes)",
    "one_pixel": "is smaller than min_side=8", "above_pixel_budget": f"exceeds max_pixels={MAX_PIXELS}",
    "missing_image": "image file not found", "missing_image_in_document": "image file not found",
    "latin1_caption": "line is not valid UTF-8", "lone_surrogate": "unpaired surrogate escape (not valid Unicode)",
    "empty_caption": "text is empty", "blank_caption": "text is empty", "malformed_json": "not valid JSON",
    "not_an_object": "is neither an image+text pair nor a segments document",
    "no_text": "is neither an image+text pair nor a segments document",
    "image_segment_without_path": "has no string 'path'", "unknown_segment_type": "has unknown type 'video'",
    "longer_than_seq_len": "is longer than data.seq_len=64",
}


def skip_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == records.__name__ and r.levelname == "WARNING"]


def test_each_bad_record_is_a_skip_counted_under_its_reason(corpus, tmp_path_factory, caplog):
    with caplog.at_level("WARNING", logger=records.__name__):
        dm = datamodule(tmp_path_factory.getbasetemp(), corpus)
    # each skipped record is logged once, with its file:line (line 1 is GOOD[0], line 2 blank) and what is wrong
    warnings = skip_warnings(caplog)
    assert len(BAD) <= records.MAX_LOGGED_SKIPS  # (under the cap: every one is logged)
    assert len(warnings) == len(BAD), warnings
    for number, (case, _, reason) in enumerate(BAD, start=3):
        (message,) = [m for m in warnings if m.startswith(f"skipping record {corpus}:{number}: ")]
        assert LOGGED[case] in message, (case, message)
        assert message.endswith(f" [counted as: {reason}]"), message  # the epoch summary's name for it
    assert dm.skipped == Counter(reason for _, _, reason in BAD)
    # RGBA, CMYK, grayscale and 16-bit images are converted, not skipped
    assert dm.train_set.stats[0].documents == len(GOOD)


def test_skipped_records_past_the_cap_are_counted_but_not_logged_one_by_one(tmp_path, tmp_path_factory, caplog):
    n = records.MAX_LOGGED_SKIPS + 3
    malformed = next(line for case, line, _ in BAD if case == "malformed_json")
    path = write_corpus(tmp_path, [GOOD[0], *[malformed] * n])
    with caplog.at_level("WARNING", logger=records.__name__):
        dm = datamodule(tmp_path_factory.getbasetemp(), path)
    assert dm.skipped == Counter({records.REASON_BAD_JSON: n})
    assert skip_warnings(caplog) == [
        *(f"skipping record {path}:{k}: not valid JSON (Expecting value at column 36) [counted as: "
          f"{records.REASON_BAD_JSON}]"
          for k in range(2, records.MAX_LOGGED_SKIPS + 2)),
        "more skipped records are counted but not logged (see the per-epoch summary)"]


@pytest.mark.parametrize("case, line, reason", BAD, ids=[case for case, _, _ in BAD])
def test_strict_mode_raises_naming_file_line_and_fix(case, line, reason, tmp_path, tmp_path_factory):
    path = write_corpus(tmp_path, [GOOD[0], line])
    with pytest.raises(JsonlRecordError) as err:
        datamodule(tmp_path_factory.getbasetemp(), path, "data.strict=true")
    message = str(err.value)
    assert message.startswith(f"{path}:2: ")
    assert "data.strict=false" in message and ";" in message  # problem; fix (strict hint)


def test_training_on_a_bad_corpus_completes_and_reports_skips_every_epoch(corpus, tmp_path, tmp_path_factory,
                                                                         capsys):
    result = train(compose_config("train", jsonl_overrides(tmp_path_factory.getbasetemp(), tmp_path / "run", corpus,
                                                           "trainer.max_steps=4", "data.batch_size=2")))
    assert result["global_step"] == 4
    expected = Counter(reason for _, _, reason in BAD)
    reports = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[data] epoch")]
    assert len(reports) >= 2, "the run should span several epochs, each reporting its skips"
    for epoch, report in enumerate(reports):
        assert report.startswith(f"[data] epoch {epoch}: skipped {len(BAD)} records: ")
        assert sorted(report.split(": ", 1)[1].split(": ", 1)[1].split("; ")) == sorted(
            f"{n} x {reason}" for reason, n in expected.items())
    assert set(logged_series(tmp_path / "run", "data/skipped_records").values()) == {float(len(BAD))}


def test_a_resume_after_the_training_data_changed_says_so(tmp_path, tmp_path_factory, caplog):
    """A record added to the JSONL (after fixing the skipped ones, say) re-packs the epoch a resume continues:
    some of its rows are read twice or never; the settings are the same, so only the rows' digest can tell."""
    path = write_corpus(tmp_path / "corpus", GOOD)

    def run(steps: int) -> None:
        overrides = jsonl_overrides(tmp_path_factory.getbasetemp(), tmp_path / "run", path, f"trainer.max_steps={steps}",
                                    "data.batch_size=2", *(["ckpt_path=last"] if steps > 2 else []))
        with caplog.at_level("WARNING", logger="chameleon_lite.cli.train"):
            train(compose_config("train", overrides))

    run(2)
    run(3)
    assert "training data changed" not in caplog.text
    write_corpus(tmp_path / "corpus", [*GOOD, pair("good3.png", "a green line again")])
    run(4)
    assert "the training data changed since the checkpoint" in caplog.text


def test_overflow_split_keeps_the_long_document_in_chunks(tmp_path, tmp_path_factory):
    long_doc = next(line for case, line, _ in BAD if case == "longer_than_seq_len")
    dm = datamodule(tmp_path_factory.getbasetemp(), write_corpus(tmp_path, [GOOD[0], long_doc]), "data.overflow=split")
    assert not dm.skipped and dm.train_set.stats[0].split_documents == 1


def test_chunks_without_a_loss_token_are_left_out_so_training_never_meets_an_empty_micro_batch(tmp_path,
                                                                                               tmp_path_factory):
    # Caption documents under loss_on=completion split at 16 tokens: the first chunk (<bos> <boi> and 14 of the
    # 16 image codes) is all prompt. Kept, a batch of one such row had no label and stopped the run in lm_loss.
    data = ["data.overflow=split", "data.seq_len=16", "data.loss_on=completion", "data.tasks={t2i: 0, caption: 1}",
            "data.batch_size=1"]
    corpus = write_corpus(tmp_path, GOOD)
    result = train(compose_config("train", jsonl_overrides(tmp_path_factory.getbasetemp(), tmp_path / "run", corpus,
                                                           *data, "trainer.max_steps=4")))
    assert result["global_step"] == 4
    dm = datamodule(tmp_path_factory.getbasetemp(), corpus, *data)
    stats = dm.train_set.stats[0]
    assert stats.split_documents == len(GOOD) and stats.no_loss_documents >= len(GOOD) - 1
    assert dm.skipped == Counter({REASON_NO_LOSS: stats.no_loss_documents})
    assert all((dm.train_set[k]["labels"] != IGNORE_INDEX).any() for k in range(len(dm.train_set)))


def test_a_file_with_no_usable_record_is_an_error_with_the_counts(tmp_path, tmp_path_factory):
    path = write_corpus(tmp_path, [line for case, line, _ in BAD if case in ("malformed_json", "missing_image")])
    with pytest.raises(ValueError, match=r"no usable records \(2 skipped"):
        datamodule(tmp_path_factory.getbasetemp(), path)


def test_missing_jsonl_file_names_the_file_and_the_key(tmp_path, tmp_path_factory):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.jsonl does not exist; fix data.train_path"):
        datamodule(tmp_path_factory.getbasetemp(), tmp_path / "nowhere.jsonl")


def test_a_damaged_code_store_is_an_error_naming_it(tmp_path, tmp_path_factory):
    basetemp = tmp_path_factory.getbasetemp()
    cache_dir = tmp_path / "cache"
    path = write_corpus(tmp_path, GOOD[:2])
    datamodule(basetemp, path, f"data.cache_dir={cache_dir}")
    (store,) = cache_dir.glob("jsonl-images-*.safetensors")
    with safe_open(str(store), framework="pt") as f:
        metadata, codes = f.metadata(), f.get_tensor("codes")
    save_file({"codes": codes + 1000}, str(store), metadata=metadata)  # ids outside the 64-code codebook
    with pytest.raises(JsonlCacheError, match=rf"{store}: stored codes span .* outside the codebook .* delete the file"):
        datamodule(basetemp, path, f"data.cache_dir={cache_dir}")


def test_out_of_range_token_ids_in_a_batch_are_refused_naming_them():
    vocab = UnifiedVocab(n_text=40, n_image=16, n_reserved=2, pad_to_multiple=8)
    module = ChameleonLightningModule(
        model={"vocab_size": vocab.size, "dim": 32, "n_layers": 1, "n_heads": 4, "max_seq_len": 16},
        optim={"warmup_steps": 0, "schedule": "constant", "min_lr_ratio": 0.1, "z_loss": 0.0}, vocab=vocab.to_dict(),
        total_steps=1)
    ids = torch.tensor([[1, 7, vocab.size + 3, 2]])
    batch = {"input_ids": ids, "labels": ids, "positions": torch.arange(4)[None], "doc_lens": torch.tensor([[4]])}
    with pytest.raises(VocabError, match=rf"train batch input_ids: ids \[{vocab.size + 3}\] are outside the vocab"):
        module.training_step(batch, 0)


@pytest.mark.parametrize("override, match", [
    ("data=jsonll", "jsonl"),  # Hydra lists the available options
    ("data.sed_len=64", "sed_len"),
])
def test_invalid_override_fails_at_composition_naming_it(override, match):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("train", [override])
    assert match in f"{err.value} {err.value.__cause__}"


@pytest.mark.parametrize("override, match", [
    ("data.train_path=null", "config key 'data.train_path' is required with data=jsonl"),
    ("data.max_pixels=0", "config key 'data.max_pixels' = 0 is invalid"),
    ("data.source=parquet", "data.source='parquet' is invalid"),
])
def test_invalid_data_value_is_a_config_error_naming_the_key(override, match, tmp_path, tmp_path_factory):
    cfg = compose_config("train", jsonl_overrides(tmp_path_factory.getbasetemp(), tmp_path, tmp_path / "t.jsonl",
                                                  override))
    with pytest.raises(ConfigError, match=re.escape(match)):
        ChameleonDataModule(cfg.data, cfg.tokenizer.dir)


def test_resuming_with_tokenizers_of_another_vocab_is_refused(tmp_path, tmp_path_factory):
    basetemp = tmp_path_factory.getbasetemp()
    train(compose_config("train", train_overrides(basetemp, tmp_path / "run", "trainer.max_steps=1",
                                                  "callbacks.checkpoint.every_n_train_steps=1")))
    # Same text model and VQ, but a vocab.json with 4 more reserved specials: every id moves by 4.
    other = shutil.copytree(shared_dir(basetemp, "tokenizer"), tmp_path / "other_tokenizer")
    base = UnifiedVocab.load(other / "vocab.json")
    UnifiedVocab(base.n_text, base.n_image, n_reserved=base.layout.n_reserved + 4).save(other / "vocab.json")
    cfg = compose_config("train", train_overrides(basetemp, tmp_path / "run", f"tokenizer.dir={other}",
                                                  f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}"))
    with pytest.raises(VocabMismatchError, match="the checkpoint has layout .* but the configured tokenizers"):
        train(cfg)


def test_a_model_vocab_size_other_than_the_tokenizers_is_refused_before_training():
    from chameleon_lite.cli.train import build_model_config
    from chameleon_lite.multimodal_tokenizer import MultimodalTokenizer

    cfg = compose_config("train", ["model.vocab_size=2048"])
    tokenizer = MultimodalTokenizer.from_dir(cfg.tokenizer.dir)
    # the Sampler (generation, eval, demo) needs the model's ids to be the vocab's: caught here, not after training
    with pytest.raises(ConfigError, match=rf"model.vocab_size=2048 but .* {tokenizer.vocab.size} ids.*vocab_size=null"):
        build_model_config(cfg, tokenizer)
    assert build_model_config(compose_config("train", []), tokenizer).vocab_size == tokenizer.vocab.size


def test_images_the_data_limits_allow_are_encoded_not_refused_again(tmp_path, tmp_path_factory):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (5, 5), (200, 30, 30)).save(tmp_path / "img" / "five.png")  # below the default min_side=8
    path = write_corpus(tmp_path, [b'{"image": "img/five.png", "text": "a tiny red square"}'] * 2)
    dm = datamodule(tmp_path_factory.getbasetemp(), path, "data.min_side=4",
                    f"data.cache_dir={tmp_path / 'cache'}")
    assert not dm.skipped and dm.tokenizer.image.min_side == 4


def test_data_limits_apply_to_images_the_code_store_already_holds(tmp_path, tmp_path_factory):
    """A store filled under looser limits, or written before it recorded image sizes, lets no image past
    data.min_side / data.max_pixels: the record is skipped under the same reason as with a fresh store."""
    basetemp, cache = tmp_path_factory.getbasetemp(), f"data.cache_dir={tmp_path / 'cache'}"
    path = write_corpus(tmp_path, [GOOD[0], pair("small.png", "a small square")])  # 40x48 and 12x12
    Image.new("RGB", (12, 12), (30, 30, 200)).save(tmp_path / "img" / "small.png")
    assert not datamodule(basetemp, path, cache).skipped  # both images encoded into the store
    (store,) = (tmp_path / "cache").glob("jsonl-images-*.safetensors")
    with safe_open(str(store), framework="pt") as f:
        metadata, codes = f.metadata(), f.get_tensor("codes")
    fresh = f"data.cache_dir={tmp_path / 'fresh'}"
    for limit, reason in (("data.min_side=16", "image below data.min_side"),
                          ("data.max_pixels=1000", "image above data.max_pixels")):
        for stored in ({k: v for k, v in metadata.items() if k == "digests"}, metadata):  # without sizes, with
            save_file({"codes": codes}, str(store), metadata=stored)
            dm = datamodule(basetemp, path, cache, limit)
            assert dm.skipped == Counter({reason: 1}) == datamodule(basetemp, path, fresh, limit).skipped
            assert len(dm._loaded_caches[0]) == 1


def test_validation_file_skips_are_counted_apart_from_the_training_skips(tmp_path, tmp_path_factory):
    train_path = write_corpus(tmp_path, GOOD)
    val_path = tmp_path / "val.jsonl"
    malformed = next(line for case, line, _ in BAD if case == "malformed_json")
    val_path.write_bytes(b"\n".join([GOOD[0], malformed, GOOD[1]]) + b"\n")
    dm = datamodule(tmp_path_factory.getbasetemp(), train_path, f"data.val_path={val_path}")
    assert dm.skipped == Counter()
    assert dm.val_skipped == Counter({records.REASON_BAD_JSON: 1})
