"""Importance criteria against hand-computed answers, brute force and scipy."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import spearmanr

from stages.importance import (
    ImportanceError,
    activation_norm,
    block_influence,
    condition_scores,
    cosine_distance_stats,
    fluctuation,
    l2_magnitude,
    normalised_interaction,
    spearman,
    taylor,
    unit_columns,
    wanda,
)

W24 = torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.5, 0.0, -1.0, 2.0]])


def _close(actual: torch.Tensor, expected, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(
        actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=rtol, atol=atol
    )


def activation_sums(x, mask=None):
    """(count, x_sum, x_sq_sum) of the real tokens, as stages/statistics.py accumulates them."""
    flat = x.reshape(-1, x.shape[-1]) if mask is None else x[mask.bool()]
    flat = flat.double()
    return flat.shape[0], flat.sum(0), flat.square().sum(0)


def gram_sum(x, mask=None):
    flat = (x.reshape(-1, x.shape[-1]) if mask is None else x[mask.bool()]).double()
    return flat.T @ flat


def test_unit_columns():
    assert unit_columns([2, 0], 2).tolist() == [4, 5, 0, 1]


def test_l2_magnitude_over_several_matrices():
    scores = l2_magnitude([torch.tensor([[3.0, 4.0], [0.0, 1.0]]), torch.tensor([[12.0], [0.0]])])
    _close(scores, [13.0, 1.0])
    with pytest.raises(ImportanceError, match="expected 2 rows"):
        l2_magnitude([torch.ones(2, 3), torch.ones(3, 3)])


def test_taylor_is_the_group_first_order_term_of_the_summed_loss():
    """By hand: y = W (m * x) with out-projection W [1, 2] and unit gates m; L = sum over 2
    "batches" of y. dL/dm_u = sum_batches W[0, u] * x_u, signed sums first, |.| at the end:
    unit 0: 2 * (1 + (-1)) = 0 (its effects cancel over the calibration set), unit 1: 3 * (2 + 1)
    = 9. That equals |sum_k dL/dW_k * W_k| over the unit's column (LLM-Pruner's vector-wise term).
    """
    w = torch.tensor([[2.0, 3.0]])
    batches = [torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 1.0])]
    mask = torch.ones(2, requires_grad=True)
    weight = w.clone().requires_grad_(True)
    sum((weight @ (mask * x)).sum() for x in batches).backward()
    _close(taylor(mask.grad), [0.0, 9.0])
    _close(taylor(mask.grad), (weight.grad * weight).sum(0).abs().detach())
    # per-batch |grad| summed would have scored unit 0 as 4: that is NOT the definition
    assert float(taylor(mask.grad)[0]) != 4.0
    with pytest.raises(ImportanceError, match="1-D"):
        taylor(torch.ones(2, 2))


def test_wanda_by_hand_2x4_unit_width_2():
    # column norms over N=4 tokens: sqrt([16, 4, 0, 36]) = [4, 2, 0, 6]; RMS = norm / 2 = [2,1,0,3]
    x_sq_sum = torch.tensor([16.0, 4.0, 0.0, 36.0])
    # per column sum_i |W_ij| * rms_j = [1.5*2, 2*1, 4*0, 6*3] = [3, 2, 0, 18]
    _close(wanda(W24, x_sq_sum, 4, unit_width=2), [5.0, 18.0])
    _close(wanda(W24, x_sq_sum, 4, unit_width=1), [3.0, 2.0, 0.0, 18.0])
    with pytest.raises(ImportanceError, match="x_sq_sum has shape"):
        wanda(W24, torch.ones(3), 4, 2)


def test_fluctuation_constant_column_scores_zero_and_matches_hand_value():
    x = torch.tensor([[1.0, 5.0, 0.0, 2.0], [3.0, 5.0, 2.0, 2.0], [2.0, 5.0, 4.0, 2.0]])
    count, x_sum, x_sq_sum = activation_sums(x)
    scores = fluctuation(W24, x_sum, x_sq_sum, count, unit_width=1)
    # sample variances [1, 0, 4, 0]; ||W_:,j||^2 = [1.25, 4, 10, 20]
    _close(scores, [1.25, 0.0, 40.0, 0.0])
    _close(fluctuation(W24, x_sum, x_sq_sum, count, unit_width=2), [1.25, 40.0])
    with pytest.raises(ImportanceError, match="count must be >= 2"):
        fluctuation(W24, x_sum, x_sq_sum, 1, 1)


def test_activation_norm_by_hand():
    # N = 2 tokens: unit 0 = cols (0, 1) with sq sums 6, 2 -> sqrt(8/2) = 2; unit 1 -> sqrt(18/2)
    _close(activation_norm(torch.tensor([6.0, 2.0, 10.0, 8.0]), 2, 2), [2.0, 3.0])


def test_cosine_stats_block_influence_and_padding():
    h = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    dist, count = cosine_distance_stats(h, h.clone())
    assert dist.dtype == torch.float64 and dist.dim() == 0 and count.item() == 6
    assert block_influence(dist, count) == pytest.approx(0.0, abs=1e-12)
    e0, e1 = torch.eye(2)[0].expand(5, 2), torch.eye(2)[1].expand(5, 2)
    assert block_influence(*cosine_distance_stats(e0, e1)) == pytest.approx(1.0)
    assert block_influence(*cosine_distance_stats(e0, -e0)) == pytest.approx(2.0)
    # padding positions hold garbage that must not count
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = h.clone()
    out[0, 2] = -100 * h[0, 2]
    out[1, 1:] = torch.randn(2, 4)
    dist_m, count_m = cosine_distance_stats(h, out, mask)
    assert count_m.item() == 3 and dist_m.item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ImportanceError, match="attention_mask shape"):
        cosine_distance_stats(h, out, torch.ones(2, 4))
    with pytest.raises(ImportanceError, match="count must be"):
        block_influence(0.0, 0)


def _leave_one_out_error(x: torch.Tensor, w: torch.Tensor, j: int) -> float:
    """Least-squares error of dropping column j and re-fitting the others to X W^T."""
    target = x @ w.T
    others = torch.cat([x[:, :j], x[:, j + 1 :]], dim=1)
    coef = torch.linalg.lstsq(others, target).solution
    return float((target - others @ coef).square().sum())


def test_condition_scores_equal_brute_force_obs_error():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    x[:, 4] = x[:, 0] + 0.05 * torch.randn(
        40, generator=gen, dtype=torch.float64
    )  # ill-conditioned
    w = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    scores = condition_scores(w, gram_sum(x), unit_width=1, damp=0.0)
    brute = [_leave_one_out_error(x, w, j) for j in range(5)]
    _close(scores, brute, rtol=1e-4, atol=1e-6)
    # the near-duplicate columns are cheap to remove although their weights are not small
    assert scores[[0, 4]].max() < scores[[1, 2, 3]].min()
    _close(
        condition_scores(w[:, :4], gram_sum(x[:, :4]), 2, damp=0.0),
        condition_scores(w[:, :4], gram_sum(x[:, :4]), 1, damp=0.0).reshape(2, 2).sum(1),
    )
    with pytest.raises(ImportanceError, match="not positive definite"):
        condition_scores(w, torch.zeros(5, 5), 1, damp=0.0)


def test_damping_makes_singular_gram_usable():
    x = torch.ones(8, 3)  # rank one
    scores = condition_scores(torch.ones(2, 3), gram_sum(x), 1, damp=0.01)
    assert torch.isfinite(scores).all() and (scores > 0).all()


def test_normalised_interaction():
    a, b = torch.tensor([1.0, -0.5]), torch.tensor([2.0, 0.25])
    _close(normalised_interaction(a + b, a, b), [0.0, 0.0])
    assert normalised_interaction(4.0, 1.0, 2.0).item() == pytest.approx(1 / 3)


def test_spearman_matches_scipy_with_ties():
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        a = torch.randint(0, 6, (30,), generator=gen).float()
        b = a + torch.randint(0, 4, (30,), generator=gen).float()
        assert spearman(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)
    assert spearman(torch.arange(5.0), -torch.arange(5.0)) == pytest.approx(-1.0)
    assert math.isnan(spearman(torch.ones(4), torch.arange(4.0)))
    with pytest.raises(ImportanceError, match="equal length"):
        spearman(torch.ones(3), torch.ones(4))


def test_low_precision_inputs_are_accumulated_in_float32():
    w = torch.randn(8, 6, generator=torch.Generator().manual_seed(4))
    sq = torch.rand(6) * 10
    low = wanda(w.bfloat16(), sq.bfloat16(), 3, 2)
    assert low.dtype == torch.float32
    _close(low, wanda(w.bfloat16().float(), sq.bfloat16().float(), 3, 2))


def test_statistics_of_two_shards_add_up_to_the_whole():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 6, generator=gen) + 3.0
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    h_out = x + 0.3 * torch.randn(2, 7, 6, generator=gen)
    w = torch.randn(4, 6, generator=gen)
    whole = activation_sums(x, mask)
    parts = [activation_sums(x[i : i + 1], mask[i : i + 1]) for i in range(2)]
    count, x_sum, x_sq = (parts[0][k] + parts[1][k] for k in range(3))
    assert count == whole[0] == 12
    _close(fluctuation(w, x_sum, x_sq, count, 2), fluctuation(w, whole[1], whole[2], whole[0], 2))
    _close(wanda(w, x_sq, count, 3), wanda(w, whole[2], whole[0], 3))
    _close(activation_norm(x_sq, count, 1), activation_norm(whole[2], whole[0], 1))
    gram = gram_sum(x[:1], mask[:1]) + gram_sum(x[1:], mask[1:])
    _close(condition_scores(w, gram, 2), condition_scores(w, gram_sum(x, mask), 2))
    d = [cosine_distance_stats(x[i : i + 1], h_out[i : i + 1], mask[i : i + 1]) for i in range(2)]
    whole_bi = block_influence(*cosine_distance_stats(x, h_out, mask))
    assert block_influence(d[0][0] + d[1][0], d[0][1] + d[1][1]) == pytest.approx(whole_bi)


def test_input_statistics_of_a_family_that_flattens_tokens():
    """OPT feeds its FFN out-projection [rows * tokens, ffn]: padding must still be left out."""
    from tiny_models import padded_batch, tiny_opt

    from stages.arch import get_adapter
    from stages.estimate import EstimateRequest, estimate_locally

    model = tiny_opt()
    ids, mask = padded_batch()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(len(ids)).long()}
    scores, stats = estimate_locally(
        model, get_adapter(model), [batch], EstimateRequest("channels", "wanda")
    )
    assert [len(s) for s in scores] == [48, 48, 48]
    assert float(stats["tokens"]) == float(mask.sum())
