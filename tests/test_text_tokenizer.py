import random

import pytest

from chameleon_lite.text_tokenizer import TextTokenizerError, iter_text_files, train_text_tokenizer

WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "left", "of", "right", "above", "below", "and", "two", "three", "four"]


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) for _ in range(1500)]


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    return train_text_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "text.model", vocab_size=300)


@pytest.mark.parametrize("text", ["a red circle left of a blue square", "Ünïcödé ✓ 日本語 🙂", "", "   ",
                                  "\ttabs\nand  newlines ", "12345 digits"])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_vocab_size_and_merges(tok):
    assert tok.vocab_size == 300
    assert len(tok.encode("a red circle")) < len("a red circle")  # learned merges, not bytes


def test_training_is_deterministic(corpus, tmp_path):
    a = train_text_tokenizer(corpus, tmp_path / "a.model", vocab_size=300)
    b = train_text_tokenizer(corpus, tmp_path / "b.model", vocab_size=300)
    assert a.path.read_bytes() == b.path.read_bytes()


def test_empty_corpus(tmp_path):
    with pytest.raises(TextTokenizerError, match="empty"):
        train_text_tokenizer(["", "  "], tmp_path / "x.model")
    assert not (tmp_path / "x.model").exists()


def test_vocab_too_large_for_corpus_keeps_old_artifact(corpus, tmp_path):
    out = tmp_path / "text.model"
    out.write_bytes(b"previous good model")
    with pytest.raises(TextTokenizerError, match="vocab_size=50000"):
        train_text_tokenizer(corpus, out, vocab_size=50000)
    assert out.read_bytes() == b"previous good model"
    assert list(tmp_path.iterdir()) == [out]


def test_vocab_too_small(corpus, tmp_path):
    with pytest.raises(TextTokenizerError, match="too small"):
        train_text_tokenizer(corpus, tmp_path / "x.model", vocab_size=100)


def test_too_few_pieces_for_the_corpus_characters_says_to_raise_vocab_size(tmp_path):
    corpus = ["".join(chr(0x4E00 + (7 * i + k) % 300) for k in range(12)) for i in range(200)]  # 300 CJK characters
    with pytest.raises(TextTokenizerError, match=r"vocab_size=320 is too small for the corpus' distinct characters"
                                                 r".*raise tokenizer.vocab_size"):
        train_text_tokenizer(corpus, tmp_path / "x.model", vocab_size=320)


def test_lines_longer_than_sentencepieces_default_limit_are_trained_on(corpus, tmp_path):
    # one paragraph per line (scraped text): sentencepiece's default skips lines over 4,192 bytes silently
    paragraphs = [" ".join(["zebrafish swims"] * 300 + corpus[i * 40:(i + 1) * 40]) for i in range(30)]
    assert min(len(p.encode()) for p in paragraphs) > 4192
    tok = train_text_tokenizer(paragraphs, tmp_path / "x.model", vocab_size=300)
    assert len(tok.encode("zebrafish swims")) <= 3  # learnt from the long lines, not spelt out in bytes


def test_text_files(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one line\n\n second line \n")
    assert list(iter_text_files([f])) == ["one line", "second line"]
    with pytest.raises(TextTokenizerError, match="missing.txt"):
        list(iter_text_files([tmp_path / "missing.txt"]))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(TextTokenizerError, match="UTF-8"):
        list(iter_text_files([bad]))


def test_missing_model_file(tmp_path):
    from chameleon_lite.text_tokenizer import TextTokenizer

    with pytest.raises(FileNotFoundError, match="chameleon-tokenizer"):
        TextTokenizer(tmp_path / "nope.model")


def test_shipped_artifacts_are_rebuilt_bit_identically(tmp_path):
    """`chameleon-tokenizer` with its defaults reproduces the committed tokenizers/shapes files."""
    from conftest import compose_config

    from chameleon_lite.cli.tokenizer import build_tokenizer
    from chameleon_lite.config import TOKENIZERS_DIR

    build_tokenizer(compose_config("train_tokenizer", [f"tokenizer.dir={tmp_path}"]))
    for name in ("text.model", "vocab.json"):
        assert (tmp_path / name).read_bytes() == (TOKENIZERS_DIR / "shapes" / name).read_bytes(), name


def test_existing_artifacts_are_replaced_only_with_overwrite(tmp_path):
    from conftest import compose_config

    from chameleon_lite.cli.tokenizer import build_tokenizer
    from chameleon_lite.config import ConfigError

    (tmp_path / "vocab.json").write_text("a vocab some model was trained with")
    small = [f"tokenizer.dir={tmp_path}", "tokenizer.shapes.n_captions=300"]
    with pytest.raises(ConfigError, match=r"vocab.json exist\(s\).*overwrite=true"):
        build_tokenizer(compose_config("train_tokenizer", small))
    assert (tmp_path / "vocab.json").read_text() == "a vocab some model was trained with"
    assert not (tmp_path / "text.model").exists()
    build_tokenizer(compose_config("train_tokenizer", [*small, "overwrite=true"]))
    assert (tmp_path / "text.model").is_file() and "n_text" in (tmp_path / "vocab.json").read_text()


def test_shipped_tokenizers_agree_with_each_other():
    from chameleon_lite.config import TOKENIZERS_DIR
    from chameleon_lite.multimodal_tokenizer import MultimodalTokenizer

    tok = MultimodalTokenizer.from_dir(TOKENIZERS_DIR / "shapes")
    assert tok.image.codebook_size == tok.vocab.n_image and tok.text.vocab_size == tok.vocab.n_text
    assert tok.tokens_per_image == 64 and (TOKENIZERS_DIR / "shapes" / "vq.safetensors").stat().st_size <= 5_000_000


def test_a_vocab_for_another_codebook_than_the_vq_beside_it_is_refused(tmp_path):
    """Each tool checks the other half of the tokenizer dir it writes into: a mismatch once surfaced only at
    chameleon-train, whose fix (rebuild vocab.json) would then retrain the text model."""
    import shutil

    from conftest import compose_config

    from chameleon_lite.cli.tokenizer import build_tokenizer
    from chameleon_lite.cli.train_vq import train_vq
    from chameleon_lite.config import TOKENIZERS_DIR, ConfigError

    for name in ("vq.yaml", "vq.safetensors"):  # a 512-code VQ
        shutil.copy(TOKENIZERS_DIR / "shapes" / name, tmp_path / name)
    with pytest.raises(ConfigError, match="tokenizer.image_codebook_size=512"):
        build_tokenizer(compose_config("train_tokenizer", [f"tokenizer.dir={tmp_path}", "tokenizer.image_codebook_size=256"]))
    assert not (tmp_path / "text.model").exists()
    vocab_dir = tmp_path / "v"
    vocab_dir.mkdir()
    shutil.copy(TOKENIZERS_DIR / "shapes" / "vocab.json", vocab_dir / "vocab.json")  # 512 image ids
    with pytest.raises(ConfigError, match="vq.model.codebook_size=512"):
        train_vq(compose_config("train_vq", [f"out_dir={vocab_dir}", f"run_dir={tmp_path / 'run'}",
                                             "vq.model.codebook_size=256", "overwrite=true"]))
    assert not (vocab_dir / "vq.safetensors").exists()
