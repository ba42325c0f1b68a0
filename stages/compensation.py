"""Closed-form compensation of a cut: refit the projection that consumed the removed units.

Why: removing heads (KV groups) or FFN channels deletes input columns of the layer's output
projection (`o_proj`, `down_proj`, `c_proj`, ...). Instead of leaving the kept columns as they
were and hoping recovery training repairs the damage, refit them so the layer's output on
calibration data stays as close as possible to the model's before the cut (FLAP, SlimGPT,
SparseGPT do this for 7B models without any training).

Per layer, with X_d the output projection's inputs in the model before the cut, Y = X_d W^T + b
its outputs, and X_p the kept columns' inputs in the compensated model (`inputs: sequential`:
the layers below already cut and refit, as SparseGPT / SlimGPT; `parallel`: the kept columns of
X_d itself), the refit solves

    min_theta ||A theta - Y||^2 + lam ||theta_w - theta0_w||^2,   A = X_p (with a column of
    ones when the projection has a bias), theta0 = the uncompensated weights (W_S, b),

a ridge pulled towards the current weights, not towards zero: a cut that removes nothing refits
to exactly the same weights, and the refit's output error on calibration data is never above
the uncompensated one's (theta0 is a candidate of the minimisation). Everything it needs is an
additive sum over tokens (`layer_sums`), so calibration rows shard over workers and the fit runs
once per layer on the reduced sums. lam = ridge x mean(diag(X_p^T X_p)).

`bias` is the rank-0 case: keep W_S, refit only the intercept (FLAP's baseline bias
compensation when inputs are parallel: delta b = W_R mean(x_R)).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

Method = Literal["none", "bias", "lsq"]
Inputs = Literal["sequential", "parallel"]


class CompensationError(ValueError):
    """A compensation that cannot be computed (the message says why)."""


@dataclass(frozen=True)
class CompensationSettings:
    """How a prune stage compensates its cut (picklable, sent to stream workers)."""

    method: Method = "none"
    inputs: Inputs = "sequential"
    ridge: float = 1e-2

    @property
    def active(self) -> bool:
        return self.method != "none"


def adds_out_proj_bias(model, adapter, stage) -> bool:
    """Does this prune stage's compensation give the output projections a bias they do not have?"""
    module = adapter.out_proj(adapter.layers(model)[0], stage.kind)
    return stage.compensate == "bias" and getattr(module, "bias", None) is None


def layer_sums(x_dense: Tensor, y_dense: Tensor, x_kept: Tensor | None) -> dict[str, Tensor]:
    """One micro-batch's additive sums for one layer (float64 on CPU).

    x_dense [N, in]: real tokens' out-projection inputs before the cut; y_dense [N, out]: its
    outputs; x_kept [N, k]: the compensated model's inputs of the kept columns (None for
    parallel inputs, where they are columns of x_dense and the fit slices one Gram matrix).
    """
    x_d = x_dense.to(torch.float32)
    sums = {
        "sum_d": x_d.sum(0),
        "y_sq": y_dense.to(torch.float32).square().sum(),
        "n": torch.tensor(float(x_d.shape[0])),
    }
    if x_kept is None:
        sums["gram_d"] = x_d.T @ x_d
    else:
        x_p = x_kept.to(torch.float32)
        sums |= {"gram_p": x_p.T @ x_p, "cross": x_p.T @ x_d, "sum_p": x_p.sum(0)}
    return {k: v.detach().to(torch.float64).cpu() for k, v in sums.items()}


@dataclass
class LayerFit:
    """A layer's refit (None where the tensor is unchanged) and its output error on calibration.

    Errors are sums over calibration tokens of ||y_refit - y||^2, relative to sum ||y||^2.
    """

    weight: Tensor | None
    bias: Tensor | None
    error_before: float
    error_after: float

    def summary(self) -> dict[str, float]:
        return {"error_before": self.error_before, "error_after": self.error_after}


def fit_layer(
    weight: Tensor,
    bias: Tensor | None,
    kept_columns: Tensor,
    sums: dict[str, Tensor],
    settings: CompensationSettings,
    *,
    add_bias: bool = False,
) -> LayerFit:
    """Refit an out-projection [out, in] whose input columns `kept_columns` stay.

    `bias`: the projection's bias (None: it has none). `add_bias`: the cut gives it one (bias
    method on a bias-free projection). Returns float64 tensors; the caller casts.
    """
    w = weight.detach().double().cpu()
    cols = kept_columns.long().cpu()
    w_s = w[:, cols]
    gram, cross, sum_p = _kept_sums(sums, cols)
    n, sum_d, y_sq = float(sums["n"]), sums["sum_d"], float(sums["y_sq"])
    intercept = bias is not None or add_bias
    b = bias.detach().double().cpu() if bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    if intercept:
        g_a = torch.cat(
            [torch.cat([gram, sum_p[:, None]], 1), torch.cat([sum_p, torch.tensor([n])])[None]]
        )
        r_a = torch.cat([cross @ w.T + torch.outer(sum_p, b), (sum_d @ w.T + n * b)[None]])
        theta0 = torch.cat([w_s.T, b[None]])
    else:
        g_a, r_a, theta0 = gram, cross @ w.T, w_s.T

    def error(theta: Tensor) -> float:
        return float((theta * (g_a @ theta)).sum() - 2 * (theta * r_a).sum() + y_sq)

    if settings.method == "bias":
        theta = theta0.clone()
        theta[-1] = (r_a[-1] - sum_p @ w_s.T) / n
    else:
        theta = _ridge_solve(g_a, r_a, theta0, settings.ridge, weight_rows=gram.shape[0])
    scale = max(y_sq, 1e-30)
    before, after = error(theta0) / scale, error(theta) / scale
    new_w = theta[: gram.shape[0]].T.contiguous() if settings.method == "lsq" else None
    new_b = theta[-1].contiguous() if intercept else None
    return LayerFit(new_w, new_b, max(before, 0.0), max(after, 0.0))


def _kept_sums(sums: dict[str, Tensor], cols: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(X_p^T X_p, X_p^T X_d, sum X_p) for the kept columns, sequential or parallel sums."""
    if "gram_d" in sums:
        g = sums["gram_d"]
        return g[cols][:, cols], g[cols], sums["sum_d"][cols]
    if sums["gram_p"].shape[0] != cols.numel():
        raise CompensationError(
            f"sums hold {sums['gram_p'].shape[0]} kept inputs but the plan keeps {cols.numel()}"
        )
    return sums["gram_p"], sums["cross"], sums["sum_p"]


def _ridge_solve(g_a: Tensor, r_a: Tensor, theta0: Tensor, ridge: float, weight_rows: int):
    """argmin ||A theta - Y||^2 + lam ||theta_w - theta0_w||^2 (no ridge on an intercept row)."""
    diag = torch.diagonal(g_a)[:weight_rows]
    lam = ridge * float(diag.mean()) if diag.numel() else 0.0
    if lam <= 0.0:
        lam = 1e-12
    d = torch.zeros(g_a.shape[0], dtype=g_a.dtype)
    d[:weight_rows] = lam
    lhs = g_a + torch.diag(d)
    rhs = r_a + d[:, None] * theta0
    try:
        return torch.linalg.solve(lhs, rhs)
    except RuntimeError as err:  # singular: an intercept with no tokens, or all-zero inputs
        raise CompensationError(f"refit system is singular ({err}); raise the ridge") from None


class Refit:
    """A plan's refit tensors per layer, {layer: {"weight": [out, k], "bias": [out]}}.

    Held in memory, or spilled to one safetensors file and read a layer at a time (a streamed
    run of a model larger than memory); pickles as its file path once spilled, so Ray workers
    that see the same disk do not receive the tensors through the object store.
    """

    def __init__(self, tensors: dict[int, dict[str, Tensor]] | None = None):
        self._tensors = dict(tensors or {})
        self._path: str | None = None
        self._layers: list[int] = sorted(self._tensors)

    def layers(self) -> list[int]:
        return list(self._layers)

    def get(self, layer: int) -> dict[str, Tensor]:
        if self._path is None:
            return dict(self._tensors.get(layer, {}))
        with safe_open(self._path, "pt") as f:
            names = [k for k in f.keys() if k.split(".", 1)[0] == str(layer)]
            return {k.split(".", 1)[1]: f.get_tensor(k) for k in names}

    def items(self) -> Iterator[tuple[int, dict[str, Tensor]]]:
        for layer in self._layers:
            yield layer, self.get(layer)

    def save(self, path: str | Path) -> None:
        flat = {
            f"{i}.{name}": t.contiguous() for i, parts in self.items() for name, t in parts.items()
        }
        save_file(flat, str(path))

    def spill(self, path: str | Path) -> None:
        """Write the tensors to `path` and read them from there from now on."""
        self.save(path)
        self._path, self._tensors = str(path), {}

    @classmethod
    def load(cls, path: str | Path) -> Refit:
        refit = cls()
        refit._path = str(path)
        with safe_open(str(path), "pt") as f:
            refit._layers = sorted({int(k.split(".", 1)[0]) for k in f.keys()})
        return refit

    def __getstate__(self) -> dict:
        return {"_tensors": self._tensors, "_path": self._path, "_layers": self._layers}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
