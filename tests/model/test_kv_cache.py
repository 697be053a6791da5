"""KV-cache decoding reproduces a full forward (fp32, 1e-5), including left-padded batched prompts."""

import pytest
import torch

from chameleon_lite.model import ChameleonLM, ModelConfig

VOCAB = 61


# image_pos: ids 40..60 are image codes of 2 x 2 grids, so random ids hold image runs that continue across
# decode calls (the cache carries each row's run length) and runs longer than a grid.
IMAGE_POS = {"image_pos_embed": True, "image_grid": 2, "image_ids": [40, VOCAB]}


@pytest.fixture(params=[{}, {"n_kv_heads": 1, "qk_norm_per_head": True}, IMAGE_POS], ids=["mha", "gqa", "image_pos"])
def model(request):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, max_seq_len=64, **request.param)
    return ChameleonLM(cfg).eval()


def test_prefill_then_token_by_token_matches_full_forward(model):
    ids = torch.randint(0, VOCAB, (2, 12))
    full = model(ids)
    cache = model.init_kv_cache(2, 16)
    steps = [model(ids[:, :5], kv_cache=cache)]
    steps += [model(ids[:, t : t + 1], kv_cache=cache) for t in range(5, 12)]
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_matches_each_prompt_alone(model):
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (3, 7, 5)]
    continuation = torch.randint(0, VOCAB, (3, 4))  # fed one token at a time after the prompts
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    token_mask = torch.zeros(3, width, dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = p
        token_mask[r, width - len(p) :] = True
    lengths = token_mask.sum(1)
    positions = (torch.arange(width) - (width - lengths)[:, None]).clamp(min=0)

    cache = model.init_kv_cache(3, width + 4)
    logits = [model(ids, positions=positions, kv_cache=cache, token_mask=token_mask, logits_to_keep=1)]
    for t in range(4):
        logits.append(model(continuation[:, t : t + 1], positions=(lengths + t)[:, None], kv_cache=cache))
    logits = torch.cat(logits, dim=1)  # (3, 5, V): after the prompt, then after each continuation token

    for r, p in enumerate(prompts):
        alone = model(torch.cat([p, continuation[r]])[None])[0, len(p) - 1 :]
        torch.testing.assert_close(logits[r], alone, atol=1e-5, rtol=1e-5)


def test_fixed_shape_decoding_matches_the_growing_cache(model):
    """After `fix_shapes` (what the sampler's compiled step needs) the cache writes by index and attends
    over all slots under the mask: same logits as slicing, and `length` stays one tensor advanced in place."""
    ids = torch.randint(0, VOCAB, (2, 10))
    token_mask = torch.ones(2, 4, dtype=torch.bool)
    token_mask[1, :2] = False  # a left-padded row
    positions = (torch.arange(4) - torch.tensor([[0], [2]])).clamp(min=0)
    logits = {}
    for fixed in (False, True):
        cache = model.init_kv_cache(2, 16)
        out = [model(ids[:, :4], positions=positions, kv_cache=cache, token_mask=token_mask)]
        if fixed:
            cache.fix_shapes()
            length = cache.length
        for t in range(4, 10):
            out.append(model(ids[:, t : t + 1], positions=positions[:, -1:] + t - 3, kv_cache=cache))
        logits[fixed] = torch.cat(out, dim=1)
    assert cache.length is length and int(length) == 10
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)


def test_token_mask_without_cache_matches_unpadded_rows(model):
    ids = torch.randint(0, VOCAB, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    token_mask = torch.tensor([[False] * 3 + [True] * 6])
    positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5]])
    out = model(padded, positions=positions, token_mask=token_mask)
    torch.testing.assert_close(out[:, 3:], model(ids), atol=1e-5, rtol=1e-5)


def test_cache_overflow_and_packing_are_refused(model):
    cache = model.init_kv_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache full"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="cannot be combined"):
        model(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache, doc_lens=torch.tensor([[4]]))
