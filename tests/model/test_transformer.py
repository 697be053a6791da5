"""ChameleonLM behaviour: shapes, document isolation in packed rows, norm variants, GQA, checkpointing,
learning, and agreement with Hugging Face's Chameleon at equal weights."""

import copy

import pytest
import torch

from chameleon_lite.model import ChameleonLM, ModelConfig, lm_loss

VOCAB = 97


def make_model(seed: int = 0, **changes) -> ChameleonLM:
    values = {"vocab_size": VOCAB, "dim": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 128, **changes}
    torch.manual_seed(seed)
    return ChameleonLM(ModelConfig(**values)).eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_shapes():
    model = make_model()
    ids = random_ids(3, 10)
    assert model(ids).shape == (3, 10, VOCAB)
    logits, hidden = model(ids, logits_to_keep=1, return_hidden=True)
    assert logits.shape == (3, 1, VOCAB) and hidden.shape == (3, 10, 64)
    torch.testing.assert_close(logits[:, 0], model(ids)[:, -1])


def test_token_in_document_2_changes_no_logit_of_document_1():
    model = make_model()
    ids = random_ids(1, 20)
    doc_lens = torch.tensor([[8, 12, 0]])
    changed = ids.clone()
    changed[0, 10] = (changed[0, 10] + 1) % VOCAB
    before, after = model(ids, doc_lens=doc_lens), model(changed, doc_lens=doc_lens)
    torch.testing.assert_close(before[:, :8], after[:, :8], atol=0, rtol=0)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


IMAGE_POS = {"image_pos_embed": True, "image_grid": 2, "image_ids": [60, VOCAB]}  # random ids hold image runs


@pytest.mark.parametrize("changes", [{}, {"n_kv_heads": 2}, {"swin_norm": True, "qk_norm_per_head": True}, IMAGE_POS])
def test_packed_row_equals_documents_run_alone(changes):
    model = make_model(**changes)
    lens = [[5, 9, 2], [16, 0, 0]]
    ids = random_ids(2, 16)
    packed = model(ids, doc_lens=torch.tensor(lens))
    for row, row_lens in enumerate(lens):
        start = 0
        for n in filter(None, row_lens):
            alone = model(ids[row : row + 1, start : start + n])
            torch.testing.assert_close(packed[row : row + 1, start : start + n], alone, atol=1e-5, rtol=1e-5)
            start += n


def test_image_codes_get_the_row_and_column_of_their_grid_cell():
    """Each run of image codes is one image in raster order: cell k of a 2 x 2 grid is (k // 2, k % 2);
    text tokens get nothing, a run restarts after text and at a document start, and the cache carries a
    run across decode calls. Row r is read from channel 0 (= r + 1), column c from channel 1 (= 10 (c + 1))."""
    model = make_model(**IMAGE_POS)
    with torch.no_grad():
        model.image_row_embed.weight.zero_()[:, 0] = torch.arange(1.0, 3.0)
        model.image_col_embed.weight.zero_()[:, 1] = torch.arange(10.0, 30.0, 10.0)
    img, txt = 60, 5
    ids = torch.tensor([[txt, img, img, img, txt, img, img, img, img, img, img, img]])
    doc_lens = torch.tensor([[9, 3]])  # the second document starts inside a run of image ids
    positions = torch.cat([torch.arange(9), torch.arange(3)])[None]
    cells = [None, 0, 1, 2, None, 0, 1, 2, 3, 0, 1, 2]
    expected = torch.tensor([[0.0, 0.0] if k is None else [k // 2 + 1, 10.0 * (k % 2 + 1)] for k in cells])
    torch.testing.assert_close(model.image_position_embedding(ids, positions)[0, :, :2], expected)

    cache = model.init_kv_cache(1, 16)
    streamed = [model.image_position_embedding(ids[:, :3], torch.arange(3)[None], cache)]
    for t in range(3, 9):  # the first document one token at a time
        streamed.append(model.image_position_embedding(ids[:, t : t + 1], torch.tensor([[t]]), cache))
    torch.testing.assert_close(torch.cat(streamed, dim=1)[0, :, :2], expected[:9])
    assert int(cache.image_run) == 4
    assert model(ids, doc_lens=doc_lens).shape == (1, 12, VOCAB)


def test_doc_lens_must_sum_to_the_row_length():
    with pytest.raises(ValueError, match="sum to the row length T=6"):
        make_model()(random_ids(1, 6), doc_lens=torch.tensor([[2, 3]]))


@pytest.mark.parametrize("flag", ["qk_norm", "swin_norm"])
def test_norm_variants_run_and_change_outputs(flag):
    ids = random_ids(2, 12)
    off = make_model(**{flag: False})
    on = make_model(**{flag: True})
    on.load_state_dict(off.state_dict(), strict=False)  # same projections; only the norms differ
    out_on, out_off = on(ids), off(ids)
    assert out_on.isfinite().all() and out_off.isfinite().all()
    assert not torch.allclose(out_on, out_off, atol=1e-4)


def test_per_head_qk_norm_with_equal_heads_equals_shared():
    shared = make_model(qk_norm_per_head=False)
    per_head = make_model(qk_norm_per_head=True)
    state = shared.state_dict()
    targets = per_head.state_dict()
    with torch.no_grad():
        for name, p in shared.named_parameters():
            if ".qk_norm." in name:
                p.normal_(1 if name.endswith("weight") else 0, 0.3)
                state[name] = p.expand_as(targets[name]).clone()
    per_head.load_state_dict(state)
    ids = random_ids(2, 12)
    torch.testing.assert_close(per_head(ids), shared(ids), atol=1e-5, rtol=1e-5)


def test_gqa_shapes_and_equivalence_to_repeated_kv_heads():
    gqa = make_model(n_heads=4, n_kv_heads=2)
    attn = gqa.layers[0].attention
    assert attn.qkv_proj.weight.shape == ((4 + 2 * 2) * 16, 64)
    assert attn.qk_norm.k_weight.shape == (16,)
    cache = gqa.init_kv_cache(3, 20)
    assert len(cache.k) == 2 and cache.k[0].shape == (3, 2, 20, 16)

    mha = make_model(n_heads=4)  # the same model with each k/v head written out for its 2 query heads
    state = gqa.state_dict()
    for i in range(2):
        q, k, v = state[f"layers.{i}.attention.qkv_proj.weight"].split([64, 32, 32])
        k, v = (w.view(2, 1, 16, 64).expand(2, 2, 16, 64).reshape(64, 64) for w in (k, v))
        state[f"layers.{i}.attention.qkv_proj.weight"] = torch.cat([q, k, v])
    mha.load_state_dict(state)
    ids = random_ids(2, 12)
    torch.testing.assert_close(gqa(ids), mha(ids), atol=1e-5, rtol=1e-5)
    doc_lens = torch.tensor([[4, 8], [12, 0]])
    torch.testing.assert_close(gqa(ids, doc_lens=doc_lens), mha(ids, doc_lens=doc_lens), atol=1e-5, rtol=1e-5)


def test_grad_checkpointing_gives_the_same_gradients():
    plain = make_model().train()
    ckpt = copy.deepcopy(plain)
    ckpt.cfg = ModelConfig(**{**vars(plain.cfg), "grad_checkpointing": True})
    ids, doc_lens = random_ids(2, 16), torch.tensor([[6, 10], [16, 0]])
    for model in (plain, ckpt):
        lm_loss(model(ids, doc_lens=doc_lens), ids.roll(-1, 1)).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_init_scales_residual_output_projections():
    model = make_model(n_layers=8, dim=256, n_heads=4)
    block = model.layers[0]
    assert block.attention.qkv_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.attention.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # / sqrt(2 * 8)
    assert block.feed_forward.down_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)


def test_num_params_and_flops_per_token():
    model = make_model(tie_embeddings=True)
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params(exclude_embeddings=True) == model.num_params() - VOCAB * 64
    n_matmul = model.num_params(exclude_embeddings=True) + VOCAB * 64  # the tied head is still a matmul
    assert model.flops_per_token(100) == 6 * n_matmul + 6 * 2 * 64 * 100


def test_overfits_one_batch():
    model = make_model(dim=64, n_layers=2).train()
    ids = random_ids(4, 32)
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        out = lm_loss(model(ids), labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert out.ce.item() < 0.1


def test_xformers_on_cpu_says_use_sdpa():
    model = make_model(attn_impl="xformers")
    with pytest.raises(RuntimeError, match="model.attn_impl=sdpa"):
        model(random_ids(1, 8), doc_lens=torch.tensor([[3, 5]]))


def test_xformers_without_a_kernel_names_the_fix(monkeypatch):
    """Seen on an H100 (torch 2.11): PyPI's xformers 0.0.35, built for torch 2.10, loads no kernel and
    raises NotImplementedError ("No operator found") inside the forward; the model says what to do."""
    import types

    from chameleon_lite.model import attention

    def no_operator(*args, **kwargs):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    fake = types.SimpleNamespace(memory_efficient_attention=no_operator,
                                 fmha=types.SimpleNamespace(attn_bias=types.SimpleNamespace(BlockDiagonalCausalMask=type)))
    monkeypatch.setattr(attention, "xformers_ops", lambda device: fake)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="matches your torch, or use model.attn_impl=sdpa"):
        attention.attend(q, q, q, None, "xformers", 0.0)


def test_xformers_gets_one_dtype_under_autocast(monkeypatch):
    """Autocast casts SDPA's inputs but not xformers': after QK-norm (fp32) q, k reached it in float32 beside a
    bf16 v, which xformers refuses (seen on an H100 under bf16-mixed). Checked here with a stand-in kernel."""
    import types

    from chameleon_lite.model import attention

    seen = []

    def kernel(q, k, v, attn_bias=None, p=0.0):
        seen.append((q.dtype, k.dtype, v.dtype))
        return q

    fake = types.SimpleNamespace(memory_efficient_attention=kernel, LowerTriangularMask=lambda: None,
                                 fmha=types.SimpleNamespace(attn_bias=types.SimpleNamespace(BlockDiagonalCausalMask=type)))
    monkeypatch.setattr(attention, "xformers_ops", lambda device: fake)
    q = k = torch.randn(1, 8, 2, 16)  # as QK-norm leaves them under CUDA autocast
    v = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attention.attend(q, k, v, None, "xformers", 0.0)
    assert seen == [(torch.bfloat16,) * 3]
    model = make_model(attn_impl="xformers")
    seen.clear()
    model(random_ids(1, 8))  # no autocast: the model's own dtype
    assert seen and all(dtypes == (torch.float32,) * 3 for dtypes in seen)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers kernels need CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_xformers_matches_sdpa_on_gpu(dtype):
    """Same outputs and gradients from both backends, plain causal and packed rows, in fp32 and under bf16
    autocast (the training precision on GPUs; bf16 rounds each backend's own way, hence wider tolerances)."""
    xops = pytest.importorskip("xformers.ops")
    try:  # a wheel built for another torch loads no kernel (xformers 0.0.35 beside torch 2.11 on an H100)
        probe = torch.zeros(1, 8, 1, 32, device="cuda", dtype=torch.bfloat16)
        xops.memory_efficient_attention(probe, probe, probe)
    except NotImplementedError as err:
        pytest.skip(f"this xformers has no CUDA kernel beside torch {torch.__version__}: {str(err).splitlines()[-1]}")
    sdpa = make_model(n_kv_heads=2).cuda().train()
    xf = copy.deepcopy(sdpa)
    xf.cfg = ModelConfig(**{**vars(sdpa.cfg), "attn_impl": "xformers"})
    ids = random_ids(2, 16).cuda()
    bound = 1e-5 if dtype == torch.float32 else 2e-2  # relative error, by norm, of outputs and each gradient

    def close(got, want):
        assert ((got - want).norm() / want.norm()).item() < bound

    for doc_lens in (None, torch.tensor([[5, 11], [16, 0]]).cuda()):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out_s, out_x = sdpa(ids, doc_lens=doc_lens).float(), xf(ids, doc_lens=doc_lens).float()
        close(out_x, out_s)
        out_s.square().mean().backward()
        out_x.square().mean().backward()
        for p, q in zip(sdpa.parameters(), xf.parameters()):
            close(q.grad, p.grad)
            p.grad = q.grad = None


@pytest.mark.parametrize("swin_norm", [False, True])
def test_matches_hf_chameleon_at_equal_weights(swin_norm):
    """The state-dict layout documented in transformer.py maps 1:1 to HF's: same hidden states and logits."""
    transformers = pytest.importorskip("transformers")
    model = make_model(n_kv_heads=2, qk_norm_per_head=True, swin_norm=swin_norm)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".qk_norm." in name:  # per-head QK-norm: make the heads, and q from k, differ
                p.normal_(1 if name.endswith("weight") else 0, 0.2)
    cfg = model.cfg
    hf = transformers.ChameleonForConditionalGeneration(transformers.ChameleonConfig(
        vocab_size=VOCAB, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, swin_norm=swin_norm, vocabulary_map={}, attn_implementation="sdpa",
    )).eval()
    ours = model.state_dict()
    hd, H, G = cfg.head_dim, cfg.n_heads, cfg.kv_heads
    state = {"model.embed_tokens.weight": ours["embed_tokens.weight"], "model.norm.weight": ours["norm.weight"],
             "lm_head.weight": ours["lm_head.weight"]}
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = ours[src + "attention.qkv_proj.weight"].split([H * hd, G * hd, G * hd])
        gate, up = ours[src + "feed_forward.gate_up_proj.weight"].chunk(2)
        state |= {
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k, dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": ours[src + "attention.o_proj.weight"],
            dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": ours[src + "feed_forward.down_proj.weight"],
            dst + "input_layernorm.weight": ours[src + "attn_norm.weight"],
            dst + "post_attention_layernorm.weight": ours[src + "ffn_norm.weight"],
        }
        for head in ("q", "k"):
            for kind in ("weight", "bias"):
                state[f"{dst}self_attn.{head}_norm.{kind}"] = ours[f"{src}attention.qk_norm.{head}_{kind}"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(name.startswith("model.vqmodel") for name in missing)
    ids = random_ids(2, 12)
    logits, hidden = model(ids, return_hidden=True)
    out = hf(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hf.model(input_ids=ids).last_hidden_state, hidden, atol=1e-5, rtol=1e-5)
