"""Does a fitted linear map stand in for removed layers? (issue #20 item 1, layer removal)

    python benchmarks/layer_compensation.py                  # k = 3 layers, 32 x 256 tokens
    python benchmarks/layer_compensation.py --layers 6

Loads the job's model and text exactly as configs/smollm2.yaml does (benchmarks/compensation.py's
`load_dense` / `job_data`), ranks layers with the registered `block_influence` criterion on the
calibration split (stages.estimate), plans the removal of the --layers least important ones with
the job's planner (stages.stage_plan) and measures, without any training, the VALIDATION
perplexity of every domain plus the unseen licence texts for these variants:

  none                  plain removal (apply_plan), what the job's layers stage does;
  map:parallel:RIDGE    each maximal run of consecutive removed layers becomes one residual linear
                        module h -> h + A h + b (A: d x d) in the layer list, fitted by ridge least
                        squares so that h_in + A h_in + b ~ h_out on the calibration tokens, with
                        h_in / h_out the hidden states entering / leaving the run in the dense model;
  map:sequential:RIDGE  the same, runs fitted in order with h_in taken from the model whose earlier
                        runs are already removed and mapped (target: still the dense h_out).

The ridge is relative to the mean input power (stages.compensation's ridge: lam = RIDGE x mean
diag(X^T X)), pulled towards A = 0, b = 0 (plain removal). Results: one JSON line per variant in
benchmarks/results/layer_compensation.jsonl (command, CPU, load average, perplexities, parameters
added, calibration boundary errors, seconds) and a table on stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from compensation import cpu, job_data, load_dense, measure  # beside this script
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.arch import get_adapter  # noqa: E402
from stages.arch.base import unwrap_model  # noqa: E402
from stages.base import apply_plan, param_count  # noqa: E402
from stages.compensation import _ridge_solve  # noqa: E402  (the job's refit solve, reused)
from stages.estimate import EstimateRequest, estimate_locally  # noqa: E402
from stages.masking import capture_layer_io  # noqa: E402
from stages.prune_stage import PruneStage  # noqa: E402
from stages.stage_plan import PlanLimits, plan_stage  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "layer_compensation.jsonl"


class ResidualMap(nn.Module):
    """h -> h + A h + b: a removed run of layers replaced by its linear stand-in.

    Sits in the decoder's layer list, so it is called like a decoder layer (hidden state first,
    then the layer's keyword arguments) and returns the hidden state (Llama family). Starts as the
    identity (A = 0, b = 0), i.e. plain removal."""

    def __init__(self, hidden: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden, dtype=dtype)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return hidden_states + self.proj(hidden_states)


def runs_of(drop: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive layer indices, as (first, last) inclusive."""
    runs: list[tuple[int, int]] = []
    for i in sorted(drop):
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def map_sums(h_in: Tensor, h_out: Tensor) -> dict[str, Tensor]:
    """Additive float64 sums of one micro-batch's real tokens ([N, d] each) for `fit_map`."""
    x = h_in.detach().double().cpu()
    y = h_out.detach().double().cpu() - x
    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    return {
        "gram": xa.T @ xa,
        "cross": xa.T @ y,
        "y_sq": y.square().sum(),
        "out_sq": h_out.detach().double().square().sum(),
    }


def add_sums(total: dict[str, Tensor] | None, part: dict[str, Tensor]) -> dict[str, Tensor]:
    return part if total is None else {k: total[k] + part[k] for k in total}


def fit_map(sums: dict[str, Tensor], ridge: float) -> tuple[Tensor, Tensor, dict[str, float]]:
    """(A [d, d], b [d], errors): ridge least squares of h_out - h_in on [h_in, 1].

    errors: sum ||h_out - map(h_in)||^2 / sum ||h_out||^2 on the calibration tokens, before
    (plain removal, A = b = 0) and after the fit."""
    gram, cross = sums["gram"], sums["cross"]
    d = gram.shape[0] - 1
    theta = _ridge_solve(gram, cross, torch.zeros_like(cross), ridge, weight_rows=d)
    residual = float((theta * (gram @ theta)).sum() - 2 * (theta * cross).sum() + sums["y_sq"])
    scale = max(float(sums["out_sq"]), 1e-30)
    errors = {"before": float(sums["y_sq"]) / scale, "after": max(residual, 0.0) / scale}
    return theta[:d].T.contiguous(), theta[d].contiguous(), errors


def remove_with_maps(model, adapter, plan, runs) -> list[int]:
    """Apply the layer plan, then put an identity ResidualMap where each run was.

    Returns the maps' positions in the layer list (run order); config.num_hidden_layers counts
    them, since the decoder loops over layers[:num_hidden_layers]."""
    apply_plan(model, adapter, plan)
    layers = adapter.layers(model)
    config = unwrap_model(model).config
    param = next(model.parameters())
    kept_before = [first - sum(1 for i in plan.drop_layers if i < first) for first, _ in runs]
    for pos in reversed(kept_before):  # later runs first: earlier positions stay valid
        layers.insert(pos, ResidualMap(config.hidden_size, param.dtype).to(param.device))
    config.num_hidden_layers = len(layers)
    return [pos + j for j, pos in enumerate(kept_before)]


def boundary_states(model, adapter, batches, runs) -> list[list[tuple[Tensor, Tensor]]]:
    """Per micro-batch, per run: the dense (h_in, h_out) of the run on the real tokens."""
    out = []
    for batch in batches:
        with torch.no_grad(), capture_layer_io(model, adapter) as io:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        real = batch["attention_mask"].bool()
        out.append([(io[first][0][real], io[last][1][real]) for first, last in runs])
    return out


def map_inputs(model, adapter, batch, position: int) -> Tensor:
    """The hidden state entering layer-list `position` on the batch's real tokens."""
    with torch.no_grad(), capture_layer_io(model, adapter) as io:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return io[position][0][batch["attention_mask"].bool()]


def mapped_model(dense, adapter, plan, runs, dense_io, batches, inputs: str, ridge: float):
    """The dense model cut by `plan` with a fitted ResidualMap per run -> (model, errors)."""
    work = copy.deepcopy(dense)
    positions = remove_with_maps(work, adapter, plan, runs)
    layers = adapter.layers(work)
    errors = []
    for j, position in enumerate(positions):
        sums = None
        for batch, states in zip(batches, dense_io):
            h_in, h_out = states[j]
            if inputs == "sequential":
                h_in = map_inputs(work, adapter, batch, position)
            sums = add_sums(sums, map_sums(h_in, h_out))
        weight, bias, err = fit_map(sums, ridge)
        proj = layers[position].proj
        with torch.no_grad():
            proj.weight.copy_(weight.to(proj.weight.dtype))
            proj.bias.copy_(bias.to(proj.bias.dtype))
        errors.append(err)
    return work, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2.yaml"))
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--layers", type=int, default=3, help="layers to remove")
    parser.add_argument(
        "--variants",
        default="none,map:parallel:0.01,map:parallel:0.1,map:sequential:0.01,map:sequential:0.1",
    )
    parser.add_argument("--calibration", type=int, default=32, help="calibration blocks")
    parser.add_argument("--block", type=int, default=256, help="tokens per block")
    parser.add_argument("--eval-blocks", type=int, default=24, help="per domain")
    parser.add_argument("--unseen", default="/usr/share/common-licenses")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    load_start = os.getloadavg()
    dense, tokenizer, overrides = load_dense(args.config, args.set, args.block)
    _, evals, batches = job_data(
        args.config, overrides, args.calibration, tokenizer, args.eval_blocks, args.unseen
    )
    adapter = get_adapter(dense)
    t0 = time.perf_counter()
    request = EstimateRequest("layers", "block_influence", objective="causal_lm")
    scores, _ = estimate_locally(dense, adapter, batches, request)
    stage = PruneStage(kind="layers", criterion="block_influence", count=args.layers)
    plan = plan_stage(dense, adapter, [stage], 0, scores, limits=PlanLimits(), version_in=0)
    runs = runs_of(plan.drop_layers)
    dense_io = boundary_states(dense, adapter, batches, runs)
    rank_seconds = time.perf_counter() - t0
    dense_ppl = measure(dense, evals)
    print(f"CPU {cpu()}; load {load_start}; calibration {args.calibration} x {args.block} tokens")
    print(f"drop {plan.drop_layers} (runs {runs}) in {rank_seconds:.1f} s; dense {dense_ppl}")
    rows = []
    for variant in args.variants.split(","):
        t0 = time.perf_counter()
        if variant == "none":
            work = copy.deepcopy(dense)
            apply_plan(work, adapter, plan)
            errors = None
        else:
            _, inputs, ridge = variant.split(":")
            work, errors = mapped_model(
                dense, adapter, plan, runs, dense_io, batches, inputs, float(ridge)
            )
        seconds = time.perf_counter() - t0
        params = param_count(work)
        perplexity = measure(work, evals)
        rows.append((variant, params, errors, perplexity, seconds))
        del work
    none_params = min(r[1] for r in rows)
    for variant, params, errors, perplexity, seconds in rows:
        result = {
            "layers": args.layers, "drop": plan.drop_layers, "runs": runs, "variant": variant,
            "calibration_blocks": args.calibration, "block": args.block, "params": params,
            "params_added": params - none_params, "boundary_error": errors and [
                {k: float(f"{v:.4g}") for k, v in e.items()} for e in errors],
            "perplexity": perplexity, "dense": dense_ppl, "seconds": round(seconds, 1),
            "rank_seconds": round(rank_seconds, 1), "command": " ".join(sys.argv), "cpu": cpu(),
            "load_average": {"start": load_start, "end": os.getloadavg()},
            "total_seconds": round(time.perf_counter() - start, 1),
        }  # fmt: skip
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(result) + "\n")
    print_table(dense_ppl, rows)


def print_table(dense: dict[str, float], rows: list) -> None:
    names = list(dense)
    print(f"{'variant':<22} {'params added':>12} " + " ".join(f"{n:>12}" for n in names)
          + "  boundary error before -> after (per run)")  # fmt: skip
    print(f"{'dense':<22} {'':>12} " + " ".join(f"{dense[n]:>12.3f}" for n in names))
    base = min(r[1] for r in rows)
    for variant, params, errors, ppl, _ in rows:
        err = ", ".join(f"{e['before']:.3g}->{e['after']:.3g}" for e in errors or [])
        print(f"{variant:<22} {params - base:>12,} "
              + " ".join(f"{ppl[n]:>12.3f}" for n in names) + f"  {err}")  # fmt: skip


if __name__ == "__main__":
    main()
