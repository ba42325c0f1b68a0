"""Importance scores for structured pruning, as pure functions of tensors.

Why: every pruning stage and baseline ranks "units" (attention heads or GQA KV groups, FFN
channels, whole layers) with one of a few published criteria. Keeping the maths here, free of
modules, hooks and I/O, lets each criterion be checked against a hand-computed answer, and lets
activation statistics travel as plain sums that add up across data shards and workers.

Conventions
-----------
* unit weight views: a sequence of tensors each shaped [units, k]; row u holds every weight of
  unit u in that matrix (k may differ between tensors; extra trailing dims are flattened).
* out-projection weights: [out_features, in_features]; the input columns are grouped by unit,
  ``unit_width`` consecutive columns per unit (head_dim * heads_per_unit, or 1 for channels).
* statistics of the out-projection input X [tokens, in] are sums, so shards simply add:
  ``count`` = N tokens, ``x_sum`` = sum_t X_t, ``x_sq_sum`` = sum_t X_t**2, ``gram`` = X^T X
  (collected by stages/statistics.py).
* maths runs in float32 (float64 where cancellation or inversion needs it) whatever the input
  dtype; per-unit scores come back as float32 [units] on the input's device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Number = int | float | Tensor


class ImportanceError(ValueError):
    """Bad input to an importance function; the message names the function and the cause."""


def _wide(t: Tensor) -> Tensor:
    """float32 view of low-precision inputs; float64 stays float64."""
    return t.double() if t.dtype == torch.float64 else t.float()


def _count(count: Number, where: str, minimum: int = 1) -> float:
    value = float(count)
    if not value >= minimum:
        raise ImportanceError(f"{where}: count must be >= {minimum} tokens, got {value}")
    return value


def _n_units(in_features: int, unit_width: int, where: str) -> int:
    if unit_width < 1 or in_features % unit_width:
        raise ImportanceError(
            f"{where}: {in_features} input columns cannot be split into units of width {unit_width}"
        )
    return in_features // unit_width


def _check_vector(out_weight: Tensor, vec: Tensor, name: str, where: str) -> None:
    if out_weight.dim() != 2:
        raise ImportanceError(
            f"{where}: out_weight must be 2-D, got shape {tuple(out_weight.shape)}"
        )
    if vec.shape != (out_weight.shape[1],):
        raise ImportanceError(
            f"{where}: {name} has shape {tuple(vec.shape)}, expected ({out_weight.shape[1]},) "
            f"to match out_weight {tuple(out_weight.shape)}"
        )


def _rows(tensors: Sequence[Tensor], where: str, name: str = "unit_weights") -> list[Tensor]:
    if len(tensors) == 0:
        raise ImportanceError(f"{where}: {name} is empty")
    units = tensors[0].shape[0]
    for i, t in enumerate(tensors):
        if t.dim() < 1 or t.shape[0] != units:
            raise ImportanceError(
                f"{where}: {name}[{i}] has shape {tuple(t.shape)}, expected {units} rows (units)"
            )
    return [_wide(t).reshape(units, -1) for t in tensors]


def unit_columns(units: Sequence[int] | Tensor, unit_width: int) -> Tensor:
    """Column indices (int64, ascending per unit) covered by ``units``: u*w .. u*w + w - 1.

    Why: bias compensation and slicing work on columns while selections speak in units.
    """
    idx = torch.as_tensor(units, dtype=torch.long).reshape(-1)
    offsets = torch.arange(unit_width, dtype=torch.long, device=idx.device)
    return (idx[:, None] * unit_width + offsets[None, :]).reshape(-1)


def _tokens(x: Tensor, attention_mask: Tensor | None, where: str) -> Tensor:
    """Rows of x [..., d] as [tokens, d], dropping positions where attention_mask [...] is 0."""
    if x.dim() < 1:
        raise ImportanceError(f"{where}: expected a tensor shaped [..., features], got a scalar")
    if attention_mask is None:
        return x.reshape(-1, x.shape[-1])
    if attention_mask.shape != x.shape[:-1]:
        raise ImportanceError(
            f"{where}: attention_mask shape {tuple(attention_mask.shape)} does not match "
            f"the leading dims {tuple(x.shape[:-1])} of the hidden states"
        )
    return x[attention_mask.bool()]


def l2_magnitude(unit_weights: Sequence[Tensor]) -> Tensor:
    """s_u = sqrt(sum_t sum_k W_t[u, k]^2) over all of the unit's matrices.

    Paper: L2-norm structured criterion (He et al. 2018, "Soft Filter Pruning").
    """
    rows = _rows(unit_weights, "l2_magnitude")
    return torch.stack([r.square().sum(dim=1) for r in rows]).sum(dim=0).sqrt().float()


def taylor(mask_grad_sum: Tensor) -> Tensor:
    """s_u = |dL/dm_u| at m = 1: the group-level first-order Taylor importance of unit u.

    Paper: LLM-Pruner (Ma et al. 2023), the vector-wise first-order term |dL/dW . W| of a coupled
    group. A gate m_u multiplies unit u's output (its columns of the out-projection input), so
    dL/dm_u = sum over the unit's out-projection weights W of dL/dW * W, and removing the unit
    (m_u: 1 -> 0) changes the loss by -dL/dm_u to first order. L is the loss SUMMED over the whole
    calibration set: the per-batch gradients are summed signed (gradients of summed losses add,
    so Ray shards reduce exactly) and the absolute value is taken once, at the end.
    """
    if mask_grad_sum.dim() != 1:
        raise ImportanceError(
            f"taylor: expected a 1-D [units] gradient sum, got {tuple(mask_grad_sum.shape)}"
        )
    return mask_grad_sum.abs()


def wanda(out_weight: Tensor, x_sq_sum: Tensor, count: Number, unit_width: int) -> Tensor:
    """s_u = sum_{i, j in u} |W_ij| * ||X_j||_2 / sqrt(N).

    Paper: Wanda (Sun et al. 2024, "A Simple and Effective Pruning Approach for LLMs").
    The 1/sqrt(N) (per-token RMS instead of the raw norm) keeps scores independent of the
    calibration size; it is one constant for every layer of a run, so rankings are unchanged.
    """
    _check_vector(out_weight, x_sq_sum, "x_sq_sum", "wanda")
    n = _count(count, "wanda")
    units = _n_units(out_weight.shape[1], unit_width, "wanda")
    rms = (_wide(x_sq_sum).clamp_min(0) / n).sqrt().float()
    per_column = _wide(out_weight).abs().sum(dim=0).float() * rms
    return per_column.reshape(units, unit_width).sum(dim=1)


def fluctuation(
    out_weight: Tensor, x_sum: Tensor, x_sq_sum: Tensor, count: Number, unit_width: int
) -> Tensor:
    """s_u = sum_{j in u} Var_t(X_j) * ||W_:,j||_2^2, sample variance over tokens (N - 1).

    Paper: FLAP (An et al. 2024, "Fluctuation-based Adaptive Structured Pruning for LLMs").
    Var_j = (x_sq_sum_j - x_sum_j^2 / N) / (N - 1), computed in float64 and clamped at 0; pass
    float64 sums when the inputs' means are large next to their spread.
    """
    _check_vector(out_weight, x_sum, "x_sum", "fluctuation")
    _check_vector(out_weight, x_sq_sum, "x_sq_sum", "fluctuation")
    n = _count(count, "fluctuation", minimum=2)
    units = _n_units(out_weight.shape[1], unit_width, "fluctuation")
    s, sq = x_sum.double(), x_sq_sum.double()
    variance = ((sq - s.square() / n) / (n - 1)).clamp_min(0)
    col_norm_sq = _wide(out_weight).square().sum(dim=0).double()
    return (variance * col_norm_sq).reshape(units, unit_width).sum(dim=1).float()


def activation_norm(x_sq_sum: Tensor, count: Number, unit_width: int) -> Tensor:
    """s_u = sqrt(sum_{j in u} x_sq_sum_j / N): RMS over tokens of the unit's activation norm.

    Paper: activation-based importance as in Minitron (Muralidharan et al. 2024, "Compact
    Language Models via Pruning and Knowledge Distillation"), aggregated as a root mean square.
    """
    if x_sq_sum.dim() != 1:
        raise ImportanceError(f"activation_norm: x_sq_sum must be 1-D, got {tuple(x_sq_sum.shape)}")
    n = _count(count, "activation_norm")
    units = _n_units(x_sq_sum.shape[0], unit_width, "activation_norm")
    per_unit = _wide(x_sq_sum).clamp_min(0).reshape(units, unit_width).sum(dim=1)
    return (per_unit / n).sqrt().float()


def cosine_distance_stats(
    h_in: Tensor, h_out: Tensor, attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(sum over non-padding tokens of 1 - cos(h_in_t, h_out_t), token count), 0-dim float64.

    Inputs are hidden states [..., hidden] entering and leaving a block; attention_mask [...]
    marks real tokens (1) and padding (0). Sums so shards add up; see :func:`block_influence`.
    Zero vectors get cos = 0 (torch's eps convention), i.e. distance 1.
    """
    if h_in.shape != h_out.shape:
        raise ImportanceError(
            f"cosine_distance_stats: h_in {tuple(h_in.shape)} and h_out "
            f"{tuple(h_out.shape)} differ in shape"
        )
    a = _tokens(h_in, attention_mask, "cosine_distance_stats").double()
    b = _tokens(h_out, attention_mask, "cosine_distance_stats").double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)
    return (1.0 - cos).sum(), torch.tensor(float(a.shape[0]), dtype=torch.float64)


def block_influence(dist_sum: Number, count: Number) -> float:
    """BI = mean over tokens of (1 - cos(h_in, h_out)); 0 = the block changes nothing.

    Paper: ShortGPT (Men et al. 2024, "Layers in LLMs are More Redundant Than You Expect").
    """
    n = _count(count, "block_influence")
    return float(dist_sum) / n


def condition_scores(
    out_weight: Tensor, gram: Tensor, unit_width: int, damp: float = 0.01
) -> Tensor:
    """s_u = sum_{j in u} ||W_:,j||^2 / [(G + damp * mean(diag G) * I)^-1]_jj, G = X^T X.

    Used by the COMP baseline's "matrix-condition-aware" neuron importance. OUR READING of
    "matrix condition": the cost of removing input column j given how well the other columns,
    through the conditioning of G, can stand in for it. By the OBS identity (Hassibi & Stork
    1993, "Optimal Brain Surgeon") the score of column j equals the least-squares error
    ||X W^T - X_{-j} B*||_F^2 left after deleting column j and optimally re-fitting the others
    (exact for damp = 0). A unit is scored by summing its columns' single-column costs, which
    ignores interactions inside the unit. ``gram`` is the accumulated sum over tokens, so the
    score is a squared error summed over the calibration tokens; damp is relative to mean(diag G).
    """
    if out_weight.dim() != 2 or gram.shape != (out_weight.shape[1], out_weight.shape[1]):
        raise ImportanceError(
            f"condition_scores: gram shape {tuple(gram.shape)} does not match out_weight "
            f"{tuple(out_weight.shape)} (expected a square [in, in] matrix)"
        )
    if damp < 0:
        raise ImportanceError(f"condition_scores: damp must be >= 0, got {damp}")
    units = _n_units(out_weight.shape[1], unit_width, "condition_scores")
    g = gram.double()
    g = (g + g.T) / 2
    scale = g.diagonal().mean()
    scale = scale if scale > 0 else torch.ones_like(scale)
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    chol, info = torch.linalg.cholesky_ex(g + damp * scale * eye)
    if int(info) != 0:
        raise ImportanceError(
            f"condition_scores: damped Gram matrix is not positive definite (damp={damp}); "
            "use damp > 0 or more calibration tokens than input columns"
        )
    inv_diag = torch.cholesky_inverse(chol).diagonal()
    per_column = out_weight.double().square().sum(dim=0) / inv_diag
    return per_column.reshape(units, unit_width).sum(dim=1).float()


def normalised_interaction(dl_ab: Number, dl_a: Number, dl_b: Number, eps: float = 1e-8) -> Tensor:
    """|dL(ab) - dL(a) - dL(b)| / (|dL(a)| + |dL(b)| + eps), element-wise (broadcast), float64.

    Source: this project's Structural Independence Assumption (SIA) check: how far the loss
    change of removing units a and b together departs from the sum of removing each alone
    (0 = additive, so per-unit scores can be trusted).
    """
    ab, a, b = (torch.as_tensor(v).double() for v in (dl_ab, dl_a, dl_b))
    return (ab - a - b).abs() / (a.abs() + b.abs() + eps)


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = torch.argsort(values, stable=True)
    _, inverse, counts = torch.unique_consecutive(
        values[order], return_inverse=True, return_counts=True
    )
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation: Pearson correlation of average ranks (ties share ranks).

    Paper: Spearman 1904; matches scipy.stats.spearmanr, including NaN for a constant input.
    """
    x, y = torch.as_tensor(a).double().reshape(-1), torch.as_tensor(b).double().reshape(-1)
    if x.numel() != y.numel() or x.numel() < 2:
        raise ImportanceError(
            f"spearman: need two inputs of equal length >= 2, got {x.numel()} and {y.numel()}"
        )
    if torch.isnan(x).any() or torch.isnan(y).any():
        raise ImportanceError("spearman: inputs contain NaN")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.square().sum() * ry.square().sum()).sqrt()
    if denom == 0:
        return float("nan")
    return float((rx * ry).sum() / denom)
