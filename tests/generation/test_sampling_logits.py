import math

import pytest
import torch

from chameleon_lite.generation.logits import gumbel_noise, mask_top_k_top_p, mix_guidance, pick_tokens

NEG_INF = float("-inf")


def test_top_k_and_top_p_use_each_rows_own_parameters():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log().repeat(4, 1)[:, [2, 0, 3, 1]]  # unsorted: ids 1, 3, 0, 2 by rank
    out = mask_top_k_top_p(logits, top_k=torch.tensor([0, 2, 0, 3]), top_p=torch.tensor([1.0, 1.0, 0.8, 0.6]))
    kept = (out > NEG_INF).tolist()
    assert kept[0] == [True, True, True, True]  # no filter
    assert kept[1] == [False, True, False, True]  # top-2: ids 1, 3
    assert kept[2] == [True, True, False, True]  # 0.5 + 0.25 < 0.8 needs a third id: 1, 3, 0
    assert kept[3] == [False, True, False, True]  # top-3, then 0.5 + 0.25 >= 0.6
    torch.testing.assert_close(out[out > NEG_INF], logits[out > NEG_INF])


def test_filters_keep_the_best_id_and_leave_masked_ids_masked():
    logits = torch.tensor([[NEG_INF, 1.0, NEG_INF, 0.5], [2.0, NEG_INF, NEG_INF, NEG_INF]])
    out = mask_top_k_top_p(logits, top_k=torch.tensor([3, 1]), top_p=torch.tensor([1e-6, 0.5]))
    assert (out > NEG_INF).tolist() == [[False, True, False, False], [True, False, False, False]]


def test_mix_guidance_matches_the_textbook_formulas_and_is_exact_at_scale_one():
    torch.manual_seed(0)
    c, i, u = torch.randn(3, 2, 50)
    torch.testing.assert_close(mix_guidance(torch.cat([c, u]), 3.0, None), u + 3.0 * (c - u))
    three_rows = mix_guidance(torch.cat([c, i, u]), 3.0, 1.5)
    torch.testing.assert_close(three_rows, u + 1.5 * (i - u) + 3.0 * (c - i))
    assert torch.equal(mix_guidance(torch.cat([c, u]), 1.0, None), c)
    assert torch.equal(mix_guidance(torch.cat([c, i, u]), 1.0, 1.0), c)
    n = torch.randn(2, 50)
    with_negative = mix_guidance(torch.cat([c, n, u]), 3.0, None, 0.5)
    torch.testing.assert_close(with_negative, u + 3.0 * (c - u) + 0.5 * (c - n))
    all_four = mix_guidance(torch.cat([c, i, n, u]), 3.0, 1.5, 0.5)
    torch.testing.assert_close(all_four, u + 1.5 * (i - u) + 3.0 * (c - i) + 0.5 * (c - n))
    assert torch.equal(mix_guidance(torch.cat([c, n, u]), 2.0, None, 0.0), mix_guidance(torch.cat([c, u]), 2.0, None))


def test_gumbel_max_draws_follow_softmax_and_greedy_rows_take_the_argmax():
    logits = torch.tensor([1.0, 0.0, -1.0, NEG_INF]).repeat(20_000, 1)
    sample = torch.arange(20_000) % 2 == 0  # odd rows greedy
    gen = torch.Generator().manual_seed(0)
    tokens = pick_tokens(logits, sample, gumbel_noise(tuple(logits.shape), gen, logits.device))
    assert (tokens[~sample] == 0).all()
    freq = torch.bincount(tokens[sample], minlength=4).float() / sample.sum()
    expected = torch.tensor([1.0, 0.0, -1.0]).softmax(0)
    assert freq[3] == 0
    torch.testing.assert_close(freq[:3], expected, atol=4 * math.sqrt(0.25 / 10_000), rtol=0)


def test_gumbel_noise_is_finite_and_reproducible():
    cpu = torch.device("cpu")
    draw = [gumbel_noise((64, 1000), torch.Generator().manual_seed(s), cpu) for s in (1, 1, 2)]
    assert torch.isfinite(draw[0]).all()
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])
    assert draw[0].mean().item() == pytest.approx(0.5772, abs=0.02)  # Euler-Mascheroni


def test_top_p_keeps_the_smallest_prefix_reaching_p_exactly():
    logits = torch.tensor([[0.0, -1.0, -2.0, -3.0]])
    first = float(logits.softmax(-1)[0, 0])  # rank 0 alone holds exactly top_p: nothing else is needed
    out = mask_top_k_top_p(logits, top_k=torch.tensor([0]), top_p=torch.tensor([first]))
    assert torch.isfinite(out).tolist() == [[True, False, False, False]]
    out = mask_top_k_top_p(logits, top_k=torch.tensor([0]), top_p=torch.tensor([first + 1e-3]))
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]
