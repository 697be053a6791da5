"""Loading never runs pickled code and nothing reaches for the network.

Static checks read the package's syntax trees (not its text, so comments and docstrings do not
count); dynamic checks load a checkpoint whose pickle would run ``os.system`` and train, export and
load a model with every socket connection failing.
"""

from __future__ import annotations

import ast
import os
import shlex
import socket
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from reliability_helpers import shared_dir, torch_threads, train_overrides

from chameleon_lite.checkpoint import CheckpointError, load_model, safe_torch_load
from chameleon_lite.cli.train import train
from chameleon_lite.config import REPO_ROOT
from chameleon_lite.multimodal_tokenizer import MultimodalTokenizer

PACKAGE = REPO_ROOT / "chameleon_lite"
NETWORK_MODULES = ("requests", "urllib.request", "urllib3", "http.client", "httpx", "aiohttp", "socket",
                   "huggingface_hub", "torch.hub", "ftplib")
NETWORK_NAMES = ("urlopen", "urlretrieve", "hf_hub_download", "snapshot_download", "load_state_dict_from_url",
                 "download_url_to_file")


def package_trees() -> list[tuple[Path, ast.AST]]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    return [(f, ast.parse(f.read_text(), filename=str(f))) for f in files]


def calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_every_torch_load_in_the_package_is_weights_only():
    loads = [(f, c) for f, tree in package_trees() for c in calls(tree) if dotted(c.func) == "torch.load"]
    assert loads, "the package should load checkpoints somewhere (checkpoint.safe_torch_load)"
    for f, call in loads:
        flag = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
        assert isinstance(flag, ast.Constant) and flag.value is True, f"{f}:{call.lineno}: torch.load without " \
                                                                       "weights_only=True"


def test_no_unpickling_and_no_network_client_in_the_package():
    for f, tree in package_trees():
        for node in ast.walk(tree):
            where = f"{f.relative_to(REPO_ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                names = []
            assert not [n for n in names if n.startswith(NETWORK_MODULES)], f"{where}: imports {names}"
            if isinstance(node, ast.Call):
                name = dotted(node.func)
                assert name.rsplit(".", 1)[-1] not in NETWORK_NAMES, f"{where}: calls {name}"
                assert not name.startswith(("pickle.load", "pickle.Unpickler", "dill.", "cloudpickle.")), \
                    f"{where}: unpickles with {name}"


class ShellPayload:
    """Pickles as a call to ``os.system(command)``: what a malicious checkpoint carries."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture
def malicious_checkpoint(tmp_path) -> tuple[Path, Path]:
    """(a .ckpt-shaped file whose unpickling touches a marker file, the marker's path)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "global_step": 0,
                "callbacks": ShellPayload(f"touch {shlex.quote(str(marker))}")}, path)
    torch.load(path, weights_only=False)  # control: an unsafe load does run the payload
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_malicious_pickle_is_refused_by_every_loader_without_running(malicious_checkpoint):
    path, marker = malicious_checkpoint
    for loader in (safe_torch_load, load_model):
        with pytest.raises(CheckpointError, match="refused to load"):
            loader(path)
        assert not marker.exists()


def test_resuming_training_from_a_malicious_checkpoint_is_refused(malicious_checkpoint, tmp_path, tmp_path_factory):
    path, marker = malicious_checkpoint
    cfg = compose_config("train", train_overrides(tmp_path_factory.getbasetemp(), tmp_path / "run", f"ckpt_path={path}"))
    with torch_threads(1), pytest.raises(CheckpointError, match="refused to load"):
        train(cfg)
    assert not marker.exists()


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to resolve a host or open a connection raises (and is recorded)."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_train_export_and_load_work_offline(no_network, tmp_path, tmp_path_factory):
    basetemp = tmp_path_factory.getbasetemp()
    with torch_threads(1):
        result = train(compose_config("train", train_overrides(basetemp, tmp_path / "run", "trainer.max_steps=2",
                                                               "export_weights=true",
                                                               "callbacks.checkpoint.every_n_train_steps=2")))
    from_ckpt, vocab, _ = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    exported, vocab2, meta = load_model(result["weights"])
    tok = MultimodalTokenizer.from_dir(meta["tokenizer_dir"])
    assert vocab == vocab2 == tok.vocab
    assert Path(meta["tokenizer_dir"]) == shared_dir(basetemp, "tokenizer").resolve()
    for (name, a), (_, b) in zip(from_ckpt.state_dict().items(), exported.state_dict().items()):
        assert torch.equal(a, b), name
    assert no_network == []


def test_a_hub_id_is_a_missing_local_directory_not_a_download(no_network):
    pytest.importorskip("transformers")
    from chameleon_lite.interop.hf import import_hf

    with pytest.raises(FileNotFoundError, match="facebook/chameleon-7b is not an HF model directory"):
        import_hf("facebook/chameleon-7b")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("facebook/chameleon-7b")
    assert no_network == []


@pytest.mark.parametrize(("content", "match"), [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 42\n", "a Git LFS pointer, not the checkpoint"),
    (b'{"model": {}}', r"not a PyTorch checkpoint .* starts with b'\{\"model\""),
    (b"epoch=3 step=100\n", "not a PyTorch checkpoint"),
    (b"\x89PNG\r\n\x1a\n" + bytes(32), "not a PyTorch checkpoint"),
])
def test_a_file_that_is_no_checkpoint_is_named_as_such(content, match, tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_model(path)


def test_weights_of_another_shape_than_the_config_are_a_checkpoint_error(tiny_checkpoint, tmp_path):
    # e.g. an exported directory whose config.json was edited: one line naming the tensor, no traceback
    import json
    from dataclasses import asdict

    from safetensors.torch import save_file

    model, vocab, _ = load_model(tiny_checkpoint)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    cfg = {**asdict(model.cfg), "ffn_dim": model.cfg.ffn_hidden_dim + 8}
    (tmp_path / "config.json").write_text(json.dumps({"model": cfg, "vocab": vocab.to_dict()}))
    with pytest.raises(CheckpointError, match=r"weights do not match the model config: .*size mismatch"):
        load_model(tmp_path)
