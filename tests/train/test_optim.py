"""``optim.name``: AdamW, or Muon for the hidden weight matrices with AdamW for the rest, stepped as one."""

import copy
import csv

import pytest
import torch

from chameleon_lite.cli.train import train
from chameleon_lite.config import ConfigError
from chameleon_lite.model import ChameleonLM, ModelConfig
from chameleon_lite.train.module import lr_lambda
from chameleon_lite.train.optim import MuonWithAdamW, build_optimizer, group_settings, parameter_groups

MUON = {"name": "muon", "lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
        "muon": {"lr_scale": 2.0, "momentum": 0.95, "nesterov": True, "ns_steps": 5, "adjust_lr": "match_rms_adamw"}}


def _model(**extra) -> ChameleonLM:
    torch.manual_seed(0)
    return ChameleonLM(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=16, **extra))


def _backward(model: ChameleonLM, seed: int) -> None:
    torch.manual_seed(seed)
    tokens = torch.randint(0, 64, (2, 16))
    model(tokens).float().log_softmax(-1)[..., 0].mean().neg().backward()


def _train_step(model: ChameleonLM, opt: torch.optim.Optimizer, seed: int) -> None:
    _backward(model, seed)
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("tied", [False, True])
def test_muon_takes_the_hidden_matrices_and_adamw_the_head_embeddings_and_norms(tied):
    model = _model(tie_embeddings=tied)
    names = {id(p): n for n, p in model.named_parameters()}
    muon, head, rest = ([names[id(p)] for p in g["params"]] for g in parameter_groups(model, MUON))
    assert sorted(muon) == sorted(n for n in names.values() if n.endswith("_proj.weight")) and len(muon) == 4 * 2
    assert head == ([] if tied else ["lm_head.weight"])  # a tied head is the embedding: no decay
    assert "embed_tokens.weight" in rest and any("qk_norm" in n for n in rest)
    assert sorted(muon + head + rest) == sorted(names.values())  # every parameter exactly once
    settings = group_settings(MUON)
    assert settings[0]["lr"] == 2e-2 and settings[0]["adjust_lr_fn"] == "match_rms_adamw"
    assert [s["weight_decay"] for s in settings] == [0.1, 0.1, 0.0]


def test_one_step_is_torch_muon_and_adamw_stepped_side_by_side():
    model, reference = _model(), _model()
    opt = build_optimizer(model, MUON)
    assert isinstance(opt, MuonWithAdamW) and len(opt.param_groups) == 3
    groups = parameter_groups(reference, MUON)
    muon, adamw = torch.optim.Muon(groups[:1]), torch.optim.AdamW(groups[1:])
    for seed in (1, 2):
        _train_step(model, opt, seed)
        _backward(reference, seed)
        muon.step(), adamw.step(), muon.zero_grad(), adamw.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert all(p.grad is None for p in model.parameters())  # zero_grad reached both optimizers' groups


def test_a_loaded_state_dict_steps_exactly_like_the_optimizer_it_came_from():
    model = _model()
    opt = build_optimizer(model, MUON)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)  # every group follows the schedule
    for seed in (1, 2):
        _train_step(model, opt, seed)
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-2 / 4, 1e-2 / 4, 1e-2 / 4])
    saved = copy.deepcopy(opt.state_dict())
    assert len(saved["state"]) == sum(1 for _ in model.parameters())  # momentum buffers and Adam moments
    clone = copy.deepcopy(model)
    loaded = build_optimizer(clone, MUON)
    loaded.load_state_dict(saved)
    assert loaded.muon.param_groups[0] is loaded.param_groups[0] and loaded.muon.state is loaded.state
    _train_step(model, opt, 3)
    _train_step(clone, loaded, 3)
    for (name, p), q in zip(model.named_parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_flat_fsdp_shards_are_refused_naming_the_strategy_to_use():
    model = _model()
    layer = model.layers[0].attention.qkv_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach().flatten())  # what FSDP leaves: a 1-D view
    with pytest.raises(ValueError, match=r"optim.name=muon .* not 2-D .*trainer=ddp .*optim=adamw"):
        build_optimizer(model, MUON)
    for block in model.layers:  # flat parameters held elsewhere: no layer weight is a model parameter
        for layer in (block.attention.qkv_proj, block.attention.o_proj, block.feed_forward.gate_up_proj,
                      block.feed_forward.down_proj):
            layer.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"optim.name=muon .* no hidden weight is a trainable parameter.*trainer=ddp"):
        build_optimizer(model, MUON)


@pytest.mark.parametrize("native", [True, False, None])
def test_muon_warns_on_a_cpu_that_emulates_bf16_only(monkeypatch, caplog, native):
    monkeypatch.setattr("chameleon_lite.train.optim.cpu_has_native_bf16", lambda: native)
    with caplog.at_level("WARNING", logger="chameleon_lite.train.optim"):
        build_optimizer(_model(), MUON)
        build_optimizer(_model(), {**MUON, "name": "adamw"})
    warned = [r.getMessage() for r in caplog.records if "without native bf16" in r.getMessage()]
    assert len(warned) == (native is False)  # None: not an x86 CPU torch can tell about; AdamW never warns
    assert all("optim=adamw" in m for m in warned)


def test_an_unknown_optimizer_is_named_at_config_time(tiny_train_cfg):
    with pytest.raises(ValueError, match=r"optim.name='lion' is invalid: use adamw, muon"):
        train(tiny_train_cfg("optim.name=lion"))


def _losses(run_dir) -> dict[int, float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.slow
def test_muon_trains_checkpoints_and_resumes_to_the_same_losses(tiny_train_cfg, tmp_path):
    result = train(tiny_train_cfg("optim=muon", "callbacks.loss_curve=null", "export_weights=false"))
    run = tmp_path / "run"
    assert result["global_step"] == 6
    losses = _losses(run)
    assert sorted(losses) == list(range(6)) and losses[5] < losses[0]
    state = torch.load(run / "checkpoints" / "step000003.ckpt", weights_only=True)["optimizer_states"][0]
    assert len(state["param_groups"]) == 3 and "momentum" in state["param_groups"][0]
    # a resume from step 3 in another run directory trains steps 3-5 exactly as the uninterrupted run did
    again = tmp_path / "again"
    train(tiny_train_cfg("optim=muon", "callbacks.loss_curve=null", "export_weights=false", f"run_dir={again}",
                         f"ckpt_path={run / 'checkpoints' / 'step000003.ckpt'}"))
    resumed = _losses(again)
    assert sorted(resumed) == [3, 4, 5]
    assert [resumed[s] for s in (3, 4, 5)] == [losses[s] for s in (3, 4, 5)]
    # the run's optimizer is part of what a resume must keep
    with pytest.raises(ConfigError, match=r"optim.name: 'muon' in the checkpoint, 'adamw' now"):
        train(tiny_train_cfg(f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=9"))
    # resume_check=warn with a new lr and Muon scale: every group continues from its own new base rate
    train(tiny_train_cfg("optim=muon", "callbacks.loss_curve=null", "export_weights=false", "ckpt_path=last",
                         "trainer.max_steps=8", "optim.lr=0.5", "optim.muon.lr_scale=0.1", "resume_check=warn"))
    with open(run / "logs" / "metrics.csv") as f:
        lrs = {int(r["step"]): [float(r[f"lr-MuonWithAdamW/pg{g}"]) for g in (1, 2, 3)]
               for r in csv.DictReader(f) if r.get("lr-MuonWithAdamW/pg1")}
    scale = lr_lambda(7, 2, 8, "cosine", 0.1)
    assert lrs[7] == pytest.approx([0.05 * scale, 0.5 * scale, 0.5 * scale])


def test_the_muon_recipe_is_the_recipe_with_muon_more_scenes_and_appearance_and_positions_of_codes_for_the_same_time():
    from conftest import compose_config

    adamw, muon = (compose_config("train", [f"experiment={e}"]) for e in ("shapes_cpu", "shapes_cpu_muon"))
    # session 24: the tokenizer trained on recoloured scenes, its codes measured on recoloured images too
    assert (muon.tokenizer.name, adamw.tokenizer.name) == ("shapes_recoloured", "shapes")
    assert muon.tokenizer.dir.endswith("tokenizers/shapes_recoloured") and muon.appearance_recolour
    assert not adamw.appearance_recolour
    assert {k: v for k, v in muon.tokenizer.items() if k not in ("name", "dir")} == {
        k: v for k, v in adamw.tokenizer.items() if k not in ("name", "dir")}
    assert (adamw.optim.name, muon.optim.name) == ("adamw", "muon")
    assert muon.trainer.max_steps == 2400 < adamw.trainer.max_steps == 2800
    assert muon.model.image_code_embed == "free+appearance" and adamw.model.image_code_embed == "free"  # session 22
    assert muon.model.image_pos_embed and not adamw.model.image_pos_embed  # session 23
    changed = ("image_code_embed", "image_pos_embed")
    assert {k: v for k, v in muon.model.items() if k not in changed} == {
        k: v for k, v in adamw.model.items() if k not in changed}
    assert muon.data.n_train == 80000 > adamw.data.n_train  # Muon overfits the recipe's 20,000 scenes (README Results)
    assert {k: v for k, v in muon.data.items() if k != "n_train"} == {k: v for k, v in adamw.data.items() if k != "n_train"}
    assert {k: v for k, v in muon.optim.items() if k not in ("name", "muon")} == {k: v for k, v in adamw.optim.items() if k != "name"}
