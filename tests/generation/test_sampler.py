import logging
from dataclasses import replace

import pytest
import torch

from chameleon_lite.generation import Mode, Sampler, SamplingConfig, cuda_graphs
from chameleon_lite.generation import sampler as sampler_module
from chameleon_lite.generation.prompts import image_context_prompt, unconditional_prompt
from chameleon_lite.generation.sampler import _scale_by_temperature
from chameleon_lite.model import ChameleonLM, ModelConfig
from chameleon_lite.vocab import UnifiedVocab

N_IMAGE_TOKENS = 4  # tokens_per_image of the tiny sampler


@pytest.fixture(scope="module")
def vocab():
    # few text ids, so that <boi> (1 of ~23 text-mode ids) is drawn often by a random model
    return UnifiedVocab(n_text=20, n_image=16, n_reserved=2)


@pytest.fixture(scope="module", params=["plain", "image_pos"])
def model(vocab, request):
    """The plain model, and one with 2-D image positions (2 x 2 grids: the cache carries image runs)."""
    torch.manual_seed(0)
    image_pos = {"image_pos_embed": True, "image_grid": 2, "image_ids": [vocab.image_offset,
                                                                        vocab.image_offset + vocab.n_image]}
    cfg = ModelConfig(vocab_size=vocab.size, dim=64, n_layers=2, n_heads=4, max_seq_len=256, init_std=0.1,
                      **(image_pos if request.param == "image_pos" else {}))
    return ChameleonLM(cfg).eval()


@pytest.fixture(scope="module")
def sampler(model, vocab):
    return Sampler(model, vocab, tokens_per_image=N_IMAGE_TOKENS)


@pytest.fixture(scope="module")
def prompts(vocab):
    text = vocab.text_to_ids([3, 1, 4, 1, 5, 9, 2, 6])
    codes = vocab.image_to_ids([7, 0, 15, 3])
    b = vocab.bos_id
    return [
        [b, *text],  # text completion
        [b, *text[:3], vocab.boi_id],  # text -> image: starts in image mode
        [b, vocab.boi_id, *codes, vocab.eoi_id],  # image -> caption
        [b, *text[:2], vocab.boi_id, *codes[:2]],  # ends inside an image: 2 codes to go
        [b],
    ]


@pytest.fixture(scope="module")
def negatives(vocab, prompts):
    """One negative prompt per prompt: other text, the same open image (so the same modality state)."""
    other = vocab.text_to_ids([8, 7, 7])
    b, boi = vocab.bos_id, vocab.boi_id
    return [[b, *other], [b, *other, boi], [b, *other], [b, *other[:1], boi, *vocab.image_to_ids([1, 2])], [b, *other]]


def _image_code_counts(vocab, tokens, open_codes):
    """Parse one output into images: the number of image ids between each <boi> and its <eoi>, and the
    codes of a trailing unfinished image (None if the output ends in text). Fails on an image id outside
    an image or any other id inside one. `open_codes`: codes of the image the prompt left open, or None."""
    counts, inside = [], open_codes
    for t in tokens:
        if t == vocab.boi_id:
            assert inside is None, "<boi> inside an image"
            inside = 0
        elif t == vocab.eoi_id:
            assert inside is not None, "<eoi> in text mode"
            counts.append(inside)
            inside = None
        elif vocab.is_image_id(t):
            assert inside is not None, f"image id {t} in text mode"
            inside += 1
        else:
            assert inside is None, f"non-image id {t} inside an image"
    return counts, inside


# ----------------------------------------------------------------------------------------- KV cache
def _full_logits(model, ids):
    return model(torch.tensor([ids]))[0, -1]


def test_head_slice_covers_exactly_the_ids_of_the_rows_mode(sampler, vocab):
    """Rows all in one mode compute only that mode's block of the head; mixed modes compute all of it."""
    text, image, end = (sampler._head_slice(torch.tensor(left)) for left in ([-1, -1], [5, 1], [0, 0]))
    ids = torch.arange(vocab.size)
    assert bool(vocab.is_image_id(ids[image]).all()) and len(ids[image]) == vocab.n_image
    assert not bool(vocab.is_image_id(ids[text]).any()) and len(ids[text]) == vocab.image_offset
    assert ids[end].tolist() == [vocab.eoi_id]
    assert sampler._head_slice(torch.tensor([-1, 3])) is None and sampler._head_slice(torch.tensor([0, 2])) is None


@pytest.mark.parametrize("guidance", [{}, {"cfg_scale": 3.0}, {"cfg_scale": 3.0, "cfg_image_scale": 1.5},
                                      {"text_cfg_scale": 2.0},
                                      {"cfg_scale": 3.0, "cfg_image_scale": 1.5, "text_cfg_scale": 2.0},
                                      {"cfg_scale": 3.0, "negative_scale": 1.0},
                                      {"cfg_scale": 3.0, "cfg_image_scale": 1.5, "negative_scale": 0.5,
                                       "text_cfg_scale": 2.0}])
def test_cached_decoding_matches_full_forward_for_every_model_row(sampler, model, vocab, prompts, negatives,
                                                                  guidance):
    """White-box: after each decode step, the logits of every model row (conditional, image-conditioned,
    unconditional; left-padded, fed through the static cache) equal a plain forward of that row's
    sequence without cache. Guidance rows hold the prompt's guidance form + the generated image context
    (generated text is dropped); their logits are only used (and checked) after an image-context token.
    Under text guidance the unconditional row keeps every generated token and is checked at every step."""
    cfg = SamplingConfig(max_new_tokens=40, seed=3, **guidance)
    negated = cfg.negative_scale is not None
    run = sampler._prefill(prompts, cfg, negatives if negated else None)
    n, checked, image_after_text = len(prompts), 0, 0
    g, text_guided = cfg.guidance_rows, cfg.text_cfg_scale is not None
    for step in range(cfg.max_new_tokens):
        head = sampler._head_slice(run.left) if step else slice(None)  # the ids this step's feed computes
        head = slice(None) if head is None else head
        sampler._step(run, step)  # feeds the tokens of step - 1: run.logits now follow out[:, :step]
        fed = run.out[:, :step].tolist()
        for i, prompt in enumerate(prompts):
            if vocab.pad_id in fed[i]:
                continue  # finished row
            rows = {0: prompt + fed[i]}
            context = [t for t in fed[i] if vocab.is_image_id(t) or t in (vocab.boi_id, vocab.eoi_id)]
            if step == 0 or (fed[i][-1:] == context[-1:] and g > 1):
                image_after_text += len(context) < len(fed[i])
                if cfg.cfg_image_scale is not None:
                    rows[1] = image_context_prompt(prompt, vocab) + context
                if negated:
                    rows[g - 2] = negatives[i] + context
                if cfg.cfg_scale is not None:
                    rows[g - 1] = unconditional_prompt(prompt, vocab) + context
            if text_guided:
                rows[g - 1] = unconditional_prompt(prompt, vocab) + fed[i]
            for block, ids in rows.items():
                expected = _full_logits(model, ids)
                torch.testing.assert_close(run.logits[block * n + i, head], expected[head], atol=1e-5,
                                           rtol=1e-5)
                checked += 1
    assert checked >= cfg.max_new_tokens * (1 + text_guided)
    assert image_after_text > 0 or g == 1  # an image was drawn after generated text


# ----------------------------------------------------------------------------------------- batching
@pytest.mark.parametrize("guidance", [{}, {"cfg_scale": 2.5}])
def test_batched_generation_equals_one_by_one(sampler, prompts, guidance):
    cfg = SamplingConfig(max_new_tokens=20, text_temperature=0.0, image_temperature=0.0, **guidance)
    batched = sampler.generate(prompts, cfg)
    assert batched == [sampler.generate([p], cfg)[0] for p in prompts]
    assert all(len(out) == cfg.max_new_tokens or out[-1] == sampler.vocab.eos_id for out in batched)


# ----------------------------------------------------------------------------------------- modality states
def test_sampled_images_have_exactly_tokens_per_image_codes_and_text_has_none(sampler, model, vocab, prompts):
    with torch.inference_mode():  # the constraint is really exercised: unmasked, image ids take a large share
        probs = model(torch.tensor([prompts[0]]))[0, -1].softmax(-1)
    assert probs[vocab.image_mask()].sum() > 0.2

    batch = prompts * 4
    cfg = SamplingConfig(max_new_tokens=120, seed=1)
    open_codes = [None, 0, None, 2, None] * 4  # what each prompt leaves open
    images = 0
    for out, codes in zip(sampler.generate(batch, cfg), open_codes):
        counts, unfinished = _image_code_counts(vocab, out, codes)
        assert counts == [N_IMAGE_TOKENS] * len(counts)
        assert unfinished is None or len(out) == cfg.max_new_tokens  # only max_new_tokens cuts an image
        images += len(counts)
    assert images >= 20  # many images were opened by a drawn <boi> and closed by the forced <eoi>


def test_text_to_image_stops_after_one_image(sampler, vocab, prompts):
    cfg = SamplingConfig(max_new_tokens=100, stop_ids=(vocab.eoi_id,), cfg_scale=3.0)
    outs = sampler.generate([prompts[1], prompts[3]], cfg)
    assert [len(o) for o in outs] == [N_IMAGE_TOKENS + 1, 2 + 1]
    assert all(o[-1] == vocab.eoi_id and all(vocab.is_image_id(t) for t in o[:-1]) for o in outs)


def test_captioning_without_images_draws_text_only(sampler, vocab, prompts):
    outs = sampler.generate([prompts[2]] * 6, SamplingConfig(max_new_tokens=40, allow_images=False, seed=3))
    for out in outs:
        assert all(vocab.is_text_id(t) for t in out[:-1]) and (len(out) == 40 or out[-1] == vocab.eos_id)


def test_stop_ids_finish_a_row_and_finished_rows_emit_pad_while_others_continue(sampler, vocab, prompts):
    cfg = SamplingConfig(max_new_tokens=30, stop_ids=(vocab.eoi_id,), allow_images=False, seed=0)
    events = list(sampler.stream([prompts[1], prompts[0]], cfg))
    steps_row0 = N_IMAGE_TOKENS + 1
    assert events[steps_row0 - 1].finished[0] and not events[steps_row0 - 2].finished[0]
    later = events[steps_row0:]
    assert later, "the text row must go on after the image row finished"
    assert all(e.tokens[0] == vocab.pad_id and e.modes[0] is Mode.DONE for e in later)
    assert all(e.modes[1] is Mode.TEXT for e in later)
    assert [e.modes[0] for e in events[:steps_row0]] == [Mode.IMAGE] * steps_row0


def test_stream_ends_when_every_row_finished(sampler, vocab, prompts):
    cfg = SamplingConfig(max_new_tokens=100, stop_ids=(vocab.eoi_id,))
    events = list(sampler.stream([prompts[1], prompts[1]], cfg))
    assert len(events) == N_IMAGE_TOKENS + 1 and all(events[-1].finished)


# ----------------------------------------------------------------------------------------- guidance
@pytest.mark.parametrize("scales", [{"cfg_scale": 1.0}, {"cfg_scale": 1.0, "cfg_image_scale": 1.0}])
def test_guidance_scale_one_draws_the_conditional_tokens(sampler, prompts, scales):
    cfg = SamplingConfig(max_new_tokens=40, seed=11, image_top_k=6, text_top_p=0.9)
    plain = sampler.generate(prompts, cfg)
    guided = sampler.generate(prompts, replace(cfg, **scales))
    assert guided == plain


@pytest.mark.parametrize("scales", [{"text_cfg_scale": 1.0}, {"cfg_scale": 3.0, "text_cfg_scale": 1.0}])
def test_text_guidance_scale_one_draws_the_unguided_text(sampler, vocab, prompts, scales):
    """u + 1 * (c - u) = c bit for bit: text at scale 1 is the unguided text (with image guidance on, the
    image codes still follow cfg_scale, so both runs are compared on the captioning prompt alone)."""
    base = {"cfg_scale": scales.get("cfg_scale")}
    cfg = SamplingConfig(max_new_tokens=16, seed=5, allow_images=False, **base)
    caption_prompt = [prompts[2]]
    assert sampler.generate(caption_prompt, replace(cfg, **scales)) == sampler.generate(caption_prompt, cfg)


def test_text_guidance_changes_the_caption(sampler, vocab, prompts):
    cfg = SamplingConfig(max_new_tokens=12, text_temperature=0.0, allow_images=False)
    plain = sampler.generate([prompts[2], prompts[0]], cfg)
    guided = sampler.generate([prompts[2], prompts[0]], replace(cfg, text_cfg_scale=4.0))
    assert guided[0] != plain[0]
    assert all(vocab.is_text_id(t) or t == vocab.eos_id for t in guided[0])


def test_negative_scale_zero_draws_the_guided_tokens_and_a_negative_changes_them(sampler, vocab, prompts,
                                                                                  negatives):
    """+ 0 * (c - n) is exact: scale 0 draws the cfg_scale tokens; a positive scale moves image codes only
    (text is drawn from the conditional row)."""
    cfg = SamplingConfig(max_new_tokens=30, seed=4, cfg_scale=2.0, image_top_k=6)
    guided = sampler.generate(prompts, cfg)
    assert sampler.generate(prompts, replace(cfg, negative_scale=0.0), negatives) == guided
    t2i = [prompts[1], prompts[3]]
    cfg = SamplingConfig(max_new_tokens=N_IMAGE_TOKENS + 1, image_temperature=0.0, stop_ids=(vocab.eoi_id,),
                         cfg_scale=2.0)
    away = sampler.generate(t2i, replace(cfg, negative_scale=6.0), [negatives[1], negatives[3]])
    assert away != sampler.generate(t2i, cfg)
    assert [len(out) for out in away] == [N_IMAGE_TOKENS + 1, N_IMAGE_TOKENS - 1]
    assert all(vocab.is_image_id(t) for out in away for t in out[:-1])


def test_negative_prompts_are_checked_against_the_config_and_their_prompts(sampler, vocab, prompts, negatives):
    cfg = SamplingConfig(max_new_tokens=4, cfg_scale=2.0)
    with pytest.raises(ValueError, match="negative_scale is None: set negative_scale"):
        sampler.generate(prompts, cfg, negatives)
    neg = replace(cfg, negative_scale=1.0)
    with pytest.raises(ValueError, match="needs one negative prompt per prompt: 5 prompts, none"):
        sampler.generate(prompts, neg)
    with pytest.raises(ValueError, match="5 prompts, 4 negatives"):
        sampler.generate(prompts, neg, negatives[:4])
    with pytest.raises(ValueError, match="negative prompt 1 must leave the same image open as prompt 1"):
        sampler.generate(prompts, neg, [negatives[0]] * 5)
    with pytest.raises(ValueError, match="negative prompt 2 is empty"):
        sampler.generate(prompts, neg, [*negatives[:2], [], *negatives[3:]])


def test_guidance_changes_image_tokens(sampler, vocab, prompts):
    cfg = SamplingConfig(max_new_tokens=N_IMAGE_TOKENS + 1, image_temperature=0.0, stop_ids=(vocab.eoi_id,))
    t2i = [prompts[1], [vocab.bos_id, *vocab.text_to_ids([8, 8, 8]), vocab.boi_id]]
    plain = sampler.generate(t2i, cfg)
    guided = sampler.generate(t2i, replace(cfg, cfg_scale=8.0))
    assert guided != plain
    for out in guided:
        assert len(out) == N_IMAGE_TOKENS + 1 and out[-1] == vocab.eoi_id


# ----------------------------------------------------------------------------------------- streaming, seeds
def test_stream_yields_the_tokens_of_generate(sampler, vocab, prompts):
    cfg = SamplingConfig(max_new_tokens=50, seed=7, cfg_scale=2.0, text_top_k=5)
    streamed = [[] for _ in prompts]
    for event in sampler.stream(prompts, cfg):
        for row, (token, mode) in enumerate(zip(event.tokens, event.modes)):
            if mode is not Mode.DONE:
                streamed[row].append(token)
                assert (mode is Mode.IMAGE) == (vocab.is_image_id(token) or token == vocab.eoi_id)
    assert streamed == sampler.generate(prompts, cfg)


def test_same_seed_same_tokens_other_seed_other_tokens_global_rng_untouched(sampler, prompts):
    rng = torch.get_rng_state()
    first = sampler.generate(prompts, SamplingConfig(max_new_tokens=30, seed=123))
    assert torch.equal(torch.get_rng_state(), rng)
    torch.manual_seed(999)  # the global RNG plays no part
    assert sampler.generate(prompts, SamplingConfig(max_new_tokens=30, seed=123)) == first
    assert sampler.generate(prompts, SamplingConfig(max_new_tokens=30, seed=124)) != first


def test_greedy_ignores_the_seed(sampler, prompts):
    cfg = {"max_new_tokens": 20, "text_temperature": 0.0, "image_temperature": 0.0}
    first = sampler.generate(prompts, SamplingConfig(seed=1, **cfg))
    assert sampler.generate(prompts, SamplingConfig(seed=2, **cfg)) == first


@pytest.mark.parametrize("temperature", [1e-30, 1e-39])
def test_a_temperature_near_zero_draws_the_greedy_tokens(sampler, prompts, temperature):
    """1 / 1e-39 overflows float32, and guided logits ~1e9 (cfg_scale 1e9) x 1 / 1e-30 do: such rows are
    shifted by their max before scaling, not turned into several ids at inf (or NaN)."""
    greedy = SamplingConfig(max_new_tokens=30, text_temperature=0.0, image_temperature=0.0, cfg_scale=1e9)
    expected = sampler.generate(prompts, greedy)
    for seed, top_p in ((0, 1.0), (1, 0.9)):
        cold = replace(greedy, text_temperature=temperature, image_temperature=temperature, text_top_p=top_p,
                       image_top_p=top_p, seed=seed)
        assert sampler.generate(prompts, cold) == expected


def test_temperature_scaling_is_unchanged_where_it_does_not_overflow():
    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 10
    scores[0, :5] = float("-inf")
    inv = torch.tensor([1 / 0.6, 1.0, 1 / 1e-38])  # the last row overflows (|scores| > 3.4): shifted by its max
    scaled = _scale_by_temperature(scores, inv)
    assert torch.equal(scaled[:2], scores[:2] * inv[:2, None])
    assert scaled[2].max() == 0 and scaled[2].argmax() == scores[2].argmax() and not scaled.isnan().any()


# ----------------------------------------------------------------------------------------- errors
def test_prompt_longer_than_the_context_budget_names_index_length_and_limit(sampler, vocab):
    long_prompt = [vocab.bos_id] + vocab.text_to_ids([1] * 199)
    with pytest.raises(ValueError, match=r"prompt 1 has 200 tokens, more than the limit 156 = .*256 .*100"):
        sampler.generate([[vocab.bos_id], long_prompt], SamplingConfig(max_new_tokens=100))


@pytest.mark.parametrize(
    ("prompts", "match"),
    [
        ([], "prompts is empty"),
        ([[1], []], "prompt 1 is empty"),
        ([[1, 10_000]], r"prompt 0 has ids \[10000\] outside the vocab"),
        ([[1, -1]], r"prompt 0 has ids \[-1\] outside the vocab"),
    ],
)
def test_bad_prompts_raise(sampler, prompts, match):
    with pytest.raises(ValueError, match=match):
        sampler.generate(prompts, SamplingConfig(max_new_tokens=4))


def test_prompt_with_text_inside_an_open_image_raises(sampler, vocab):
    bad = [vocab.bos_id, vocab.boi_id, *vocab.image_to_ids([1]), vocab.text_to_ids([2])[0]]
    with pytest.raises(ValueError, match="prompt 0 ends inside an image"):
        sampler.generate([bad], SamplingConfig(max_new_tokens=4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cfg_scale": -0.5}, "cfg_scale=-0.5 must be finite and >= 0"),
        ({"cfg_scale": 2.0, "cfg_image_scale": -1.0}, "cfg_image_scale=-1.0 must be finite and >= 0"),
        ({"cfg_image_scale": 1.5}, "cfg_image_scale needs cfg_scale"),
        ({"negative_scale": 1.0}, "negative_scale needs cfg_scale"),
        ({"cfg_scale": 2.0, "negative_scale": -1.0}, "negative_scale=-1.0 must be finite and >= 0"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"text_temperature": -1.0}, "text_temperature"),
        ({"image_top_p": 0.0}, "image_top_p"),
        ({"image_top_k": -3}, "image_top_k"),
        ({"text_cfg_scale": -1.0}, "text_cfg_scale"),
        ({"text_temperature": float("inf")}, "text_temperature=inf must be finite"),  # inf x logits = NaN
        ({"cfg_scale": float("inf")}, "cfg_scale=inf must be finite"),
    ],
)
def test_bad_sampling_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_bad_stop_ids_and_mismatched_vocab_raise(sampler, model, vocab, prompts):
    with pytest.raises(ValueError, match="stop id"):
        sampler.generate(prompts, SamplingConfig(max_new_tokens=4, stop_ids=(vocab.image_offset,)))
    padding = vocab.image_offset + vocab.n_image  # the first id that only pads the vocabulary
    assert padding < vocab.size
    with pytest.raises(ValueError, match=f"ids from {padding} up only pad"):
        sampler.generate(prompts, SamplingConfig(max_new_tokens=4, stop_ids=(padding,)))
    with pytest.raises(ValueError, match="vocab_size"):
        Sampler(model, UnifiedVocab(n_text=500, n_image=16), tokens_per_image=4)


@pytest.mark.slow
def test_compiled_decode_draws_the_eager_tokens(model, vocab, prompts):
    cfg = SamplingConfig(max_new_tokens=12, seed=4, cfg_scale=2.0)
    eager = Sampler(model, vocab, tokens_per_image=N_IMAGE_TOKENS).generate(prompts, cfg)
    compiled = Sampler(model, vocab, tokens_per_image=N_IMAGE_TOKENS, compile=True)
    assert compiled.generate(prompts, cfg) == eager
    streamed = [event.tokens for event in compiled.stream(prompts, cfg)]
    assert [[t for t in row if t != vocab.pad_id] for row in zip(*streamed)] == eager


@pytest.mark.slow
def test_compiled_decode_is_one_graph_for_all_steps(model, vocab, prompts):
    """Fixed cache shapes: every step of a text-only run reuses one graph (no per-step recompiles)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = Sampler(model, vocab, tokens_per_image=N_IMAGE_TOKENS, compile=True)
    cfg = SamplingConfig(max_new_tokens=10, text_temperature=0.0, allow_images=False)
    text_prompts = [prompts[0], prompts[4]]
    first = compiled.generate(text_prompts, cfg)
    assert compiled.generate(text_prompts, replace(cfg, max_new_tokens=7)) == [r[:7] for r in first]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("model", ["plain"], indirect=True)
def test_compiled_decode_outlives_dynamos_recompile_limit_then_decodes_eagerly(model, vocab, prompts, monkeypatch,
                                                                               caplog):
    """Each batch size is a new graph. Dynamo's recompile limit (8; 1 here, to compile little) no longer ends
    the session: the sampler compiles up to its own `COMPILED_GRAPHS_LIMIT` (2 here), then decodes eagerly
    with one warning. Every call draws the eager tokens."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(sampler_module, "COMPILED_GRAPHS_LIMIT", 2)
    eager = Sampler(model, vocab, tokens_per_image=N_IMAGE_TOKENS)
    compiled = Sampler(model, vocab, tokens_per_image=N_IMAGE_TOKENS, compile=True)
    cfg = SamplingConfig(max_new_tokens=3, text_temperature=0.0, allow_images=False)
    warnings = []
    with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level(logging.WARNING, sampler_module.__name__):
        for batch in range(1, 5):
            rows = [prompts[0], prompts[4]][:batch] + [prompts[2]] * (batch - 2)
            assert compiled.generate(rows, cfg) == eager.generate(rows, cfg)
            warnings = [r.getMessage() for r in caplog.records if r.name == sampler_module.__name__]
            assert len(warnings) == (batch > 2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # batch sizes 3 and 4 ran eagerly
    assert "reached its limit of graphs (COMPILED_GRAPHS_LIMIT=2" in warnings[0]


def test_a_model_with_active_dropout_is_refused(vocab, prompts):
    cfg = ModelConfig(vocab_size=vocab.size, dim=64, n_layers=1, n_heads=4, max_seq_len=64, resid_dropout=0.1)
    with pytest.raises(ValueError, match=r"training mode with dropout .* model.eval\(\)"):
        Sampler(ChameleonLM(cfg), vocab, tokens_per_image=4).generate(prompts, SamplingConfig())


def test_kept_decode_buffers_draw_the_fresh_tokens_and_are_never_shared_mid_call(model, vocab, prompts, monkeypatch):
    """What `cuda_graphs=True` does to the decode state, run eagerly on the CPU: repeated calls of one shape
    decode in the same KV cache and positions tensors, reset, and draw what a fresh sampler draws; a call made
    while a `stream` is still decoding gets its own buffers; a call that ends (finished, closed, or failed in
    its prefill) frees them for the next; older shapes are dropped past `MAX_BUFFER_SETS`."""
    fresh = Sampler(model, vocab, tokens_per_image=N_IMAGE_TOKENS)
    kept = Sampler(model, vocab, tokens_per_image=N_IMAGE_TOKENS)
    graphs = kept._graphs = cuda_graphs.DecodeGraphs(model)  # what cuda_graphs=True makes on CUDA
    monkeypatch.setattr(graphs, "step_graph", lambda *a: None)  # no recording on the CPU: eager steps
    used = []  # the cache each call decodes in
    claim = graphs.claim

    def spy(rows, slots, device):
        cache, positions = claim(rows, slots, device)
        used.append(cache)
        return cache, positions

    monkeypatch.setattr(graphs, "claim", spy)
    cfg = SamplingConfig(max_new_tokens=12, seed=4, cfg_scale=2.0)
    other = replace(cfg, seed=5)
    expected, expected_other = fresh.generate(prompts, cfg), fresh.generate(prompts, other)
    assert kept.generate(prompts, cfg) == expected
    (buffers,) = graphs.buffers.values()
    assert not buffers.busy
    assert kept.generate(prompts, other) == expected_other
    assert used[-1] is buffers.cache and list(graphs.buffers.values()) == [buffers]  # the same buffers, reset

    stream = kept.stream(prompts, cfg)
    first_event = next(stream)  # this call holds the kept buffers until it ends
    assert buffers.busy
    assert kept.generate(prompts, other) == expected_other
    assert used[-1] is not buffers.cache  # new buffers, not the stream's
    streamed = [first_event.tokens] + [event.tokens for event in stream]
    assert [[t for t in row if t != vocab.pad_id] for row in zip(*streamed)] == expected
    assert not buffers.busy

    stream = kept.stream(prompts, cfg)
    next(stream)
    stream.close()  # a caller that stops reading
    assert not buffers.busy

    with monkeypatch.context() as patch, pytest.raises(MemoryError):
        patch.setattr(kept.model, "forward", lambda *a, **k: (_ for _ in ()).throw(MemoryError("prefill")))
        kept.generate(prompts, cfg)
    assert not buffers.busy

    for width in range(1, cuda_graphs.MAX_BUFFER_SETS + 2):  # new row counts: new shapes
        kept.generate([prompts[0]] * width, cfg)
    assert len(graphs.buffers) == cuda_graphs.MAX_BUFFER_SETS
    kept.clear_buffers()
    assert not graphs.buffers


def _graph_stand_ins(monkeypatch):
    """`StepGraph` without CUDA: the warm-up runs the step, recording runs nothing, each replay runs the step
    on the graph's own inputs and writes its outputs, as a recorded graph does."""
    def record(call, device):
        outputs = []

        def replay():
            outputs[:] = [t.clone() for t in call()]

        return replay, outputs

    monkeypatch.setattr(cuda_graphs.StepGraph, "_warm_up", staticmethod(lambda call, device: call()))
    monkeypatch.setattr(cuda_graphs.StepGraph, "_record", staticmethod(record))


GRAPH_CONFIGS = {  # one shape (2 rows per prompt) for the first six: a key that missed a setting would mix them
    "cfg": {"cfg_scale": 2.0},
    "cfg_3": {"cfg_scale": 3.0},
    "cfg_top_k": {"cfg_scale": 2.0, "image_top_k": 5},
    "cfg_and_text_cfg": {"cfg_scale": 2.0, "text_cfg_scale": 1.5},
    "text_cfg_top_p": {"text_cfg_scale": 1.5, "text_top_p": 0.9},
    "cfg_greedy": {"cfg_scale": 2.0, "text_temperature": 0.0, "image_temperature": 0.0},
    "no_guidance_top_k": {"image_top_k": 5},
    "image_cfg": {"cfg_scale": 2.0, "cfg_image_scale": 1.5},
    "negatives_top_k": {"cfg_scale": 2.0, "negative_scale": 1.0, "image_top_k": 5},
}


def test_recorded_steps_replay_the_eager_tokens_in_every_guidance_setting(model, vocab, prompts, negatives,
                                                                          monkeypatch):
    """The CUDA-graph bookkeeping, on the CPU with stand-ins for capture and replay: each step replays with its
    own copies of the call's inputs (tokens, noise, modality state, rules), the warm-up's state advance is
    rewound, and a recorded step is reused only for what it was recorded for, across calls and settings."""
    _graph_stand_ins(monkeypatch)
    eager = Sampler(model, vocab, tokens_per_image=N_IMAGE_TOKENS)
    graphed = Sampler(model, vocab, tokens_per_image=N_IMAGE_TOKENS)
    graphed._graphs = cuda_graphs.DecodeGraphs(model)  # what cuda_graphs=True makes on CUDA
    recorded = {}
    for rounds in range(2):
        for name, options in GRAPH_CONFIGS.items():
            cfg = SamplingConfig(max_new_tokens=12, seed=4 + rounds, **options)
            extra = {"negatives": negatives} if "negative_scale" in options else {}
            assert graphed.generate(prompts, cfg, **extra) == eager.generate(prompts, cfg, **extra), name
        graphs = {(shape, key): g for shape, kept in graphed._graphs.buffers.items() for key, g in kept.graphs.items()}
        if rounds == 0:
            recorded = graphs
    assert graphed.cuda_graphs and recorded
    assert all(graphs[k] is g for k, g in recorded.items())  # the second round replayed, recorded nothing again


@pytest.mark.parametrize("model", ["plain"], indirect=True)
def test_a_step_that_cannot_be_recorded_is_decoded_eagerly(model, vocab, prompts, monkeypatch, caplog):
    def broken(call, device):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    _graph_stand_ins(monkeypatch)
    monkeypatch.setattr(cuda_graphs.StepGraph, "_record", staticmethod(broken))
    cfg = SamplingConfig(max_new_tokens=8, seed=3, cfg_scale=2.0)
    graphed = Sampler(model, vocab, tokens_per_image=N_IMAGE_TOKENS)
    graphed._graphs = cuda_graphs.DecodeGraphs(model)
    with caplog.at_level(logging.WARNING, cuda_graphs.__name__):
        assert graphed.generate(prompts, cfg) == Sampler(model, vocab, tokens_per_image=N_IMAGE_TOKENS).generate(
            prompts, cfg)
    messages = [r.getMessage() for r in caplog.records if r.name == cuda_graphs.__name__]
    assert len(messages) == 1 and "operation not permitted" in messages[0]
    assert not graphed.cuda_graphs and not graphed._graphs.buffers


@pytest.mark.parametrize("model", ["plain"], indirect=True)
def test_a_decode_step_the_compiler_fails_to_build_is_decoded_eagerly(model, vocab, prompts, caplog):
    """torch 2.11's Triton failed on one fused kernel of the step on an H100 (`PassManager::run failed`):
    the sampler then says so once and draws the eager tokens."""
    def broken(*args, **kwargs):
        raise torch._dynamo.exc.BackendCompilerFailed(broken, RuntimeError("PassManager::run failed"), None)

    cfg = SamplingConfig(max_new_tokens=8, seed=3, cfg_scale=2.0)
    eager = Sampler(model, vocab, tokens_per_image=N_IMAGE_TOKENS).generate(prompts, cfg)
    compiled = Sampler(model, vocab, tokens_per_image=N_IMAGE_TOKENS, compile=True)
    compiled._compiled_feed_and_draw = broken
    with caplog.at_level(logging.WARNING, sampler_module.__name__):
        assert compiled.generate(prompts, cfg) == eager
        assert compiled.generate(prompts, cfg) == eager
    messages = [r.getMessage() for r in caplog.records if r.name == sampler_module.__name__]
    assert len(messages) == 1 and "RuntimeError: PassManager::run failed" in messages[0]
    assert "compile=false" in messages[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_decode_draws_the_eager_tokens(model, vocab, prompts, compile):
    """`cuda_graphs=True` records each step once per shape and head slice and replays it: the eager tokens,
    call after call (the recorded graphs replay in later calls), streamed too, with other rules (greedy)."""
    gpu = type(model)(model.cfg).cuda().eval()
    gpu.load_state_dict(model.state_dict())
    eager = Sampler(gpu, vocab, tokens_per_image=N_IMAGE_TOKENS)
    graphed = Sampler(gpu, vocab, tokens_per_image=N_IMAGE_TOKENS, compile=compile, cuda_graphs=True)
    for seed in (4, 5, 6):
        cfg = SamplingConfig(max_new_tokens=12, seed=seed, cfg_scale=2.0)
        assert graphed.generate(prompts, cfg) == eager.generate(prompts, cfg)
    (kept,) = graphed._graphs.buffers.values()
    recorded = dict(kept.graphs)
    assert graphed.cuda_graphs and recorded  # recording worked (a failure switches cuda_graphs off)
    streamed = [event.tokens for event in graphed.stream(prompts, cfg)]
    assert [[t for t in row if t != vocab.pad_id] for row in zip(*streamed)] == eager.generate(prompts, cfg)
    greedy = replace(cfg, text_temperature=0.0, image_temperature=0.0)
    assert graphed.generate(prompts, greedy) == eager.generate(prompts, greedy)
    assert all(kept.graphs[key] is graph for key, graph in recorded.items())  # replayed, not re-recorded
    assert not kept.busy
