"""benchmarks/layer_compensation.py's maths: the residual linear map that stands in for removed
layers is fitted by least squares, sits where the run was, and reduces the boundary error."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tiny_models import tiny_llama
from transformers import LlamaForCausalLM

from stages.arch import get_adapter
from stages.base import PrunePlan, apply_plan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import layer_compensation as lc  # noqa: E402  (a benchmark script, beside compensation.py)


def batches(n: int = 3, rows: int = 4, length: int = 12, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[0, :3] = 0  # left padding: padded positions must not enter the fit
        out.append({"input_ids": torch.randint(3, 100, (rows, length), generator=gen),
                    "attention_mask": mask})  # fmt: skip
    return out


def layer_plan(model, drop: list[int]) -> PrunePlan:
    n = len(get_adapter(model).layers(model))
    return PrunePlan(stage="layers", granularity="layers", criterion="block_influence",
                     version_in=0, params_before=0, params_to_remove=0, drop_layers=drop,
                     scores=[0.0] * n)  # fmt: skip


def test_runs_of_groups_consecutive_layers():
    assert lc.runs_of([9, 3, 4, 7, 10]) == [(3, 4), (7, 7), (9, 10)]
    assert lc.runs_of([]) == []


def test_fit_recovers_an_affine_map_and_is_zero_when_the_run_does_nothing():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(400, 6, generator=gen, dtype=torch.float64)
    m, c = torch.randn(6, 6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen)
    weight, bias, errors = lc.fit_map(lc.map_sums(x, x @ m.T + c), ridge=1e-9)
    assert torch.allclose(weight, m - torch.eye(6, dtype=weight.dtype), atol=1e-5)
    assert torch.allclose(bias, c.double(), atol=1e-5)
    assert errors["before"] > 0.1 and errors["after"] < 1e-8
    weight, bias, errors = lc.fit_map(lc.map_sums(x, x), ridge=1e-2)
    assert weight.abs().max() < 1e-12 and bias.abs().max() < 1e-12
    assert errors == {"before": 0.0, "after": 0.0}


def test_identity_maps_are_plain_removal_and_a_fitted_map_shrinks_the_boundary_error():
    dense = tiny_llama(LlamaForCausalLM, num_hidden_layers=5).eval()
    adapter = get_adapter(dense)
    plan, data = layer_plan(dense, [1, 2, 4]), batches()
    runs = lc.runs_of(plan.drop_layers)
    plain = lc.copy.deepcopy(dense)
    apply_plan(plain, adapter, plan)
    mapped = lc.copy.deepcopy(dense)
    positions = lc.remove_with_maps(mapped, adapter, plan, runs)
    assert positions == [1, 3] and mapped.config.num_hidden_layers == 4
    with torch.no_grad():
        assert torch.equal(plain(**data[0]).logits, mapped(**data[0]).logits)
    dense_io = lc.boundary_states(dense, adapter, data, runs)
    for inputs in ("parallel", "sequential"):
        model, errors = lc.mapped_model(dense, adapter, plan, runs, dense_io, data, inputs, 1e-3)
        # sequential: every map's closed-form error is the one the final model shows where its
        # run was (later maps sit above it); parallel: the first map's (its inputs are dense)
        checked = runs if inputs == "sequential" else runs[:1]
        for j, (position, err) in enumerate(zip(positions, errors)):
            assert err["after"] < 0.8 * err["before"]
            if j < len(checked):
                h_out = torch.cat([states[j][1] for states in dense_io])
                left = torch.cat([run_output(model, adapter, b, position) for b in data])
                seen = float((left - h_out).square().sum() / h_out.square().sum())
                assert abs(seen - err["after"]) < 1e-3 * err["before"]
        with torch.no_grad():
            assert not torch.allclose(plain(**data[0]).logits, model(**data[0]).logits)


def run_output(model, adapter, batch, position: int) -> torch.Tensor:
    """What leaves layer-list `position` (a map) on the batch's real tokens."""
    with torch.no_grad(), lc.capture_layer_io(model, adapter) as io:
        model(**batch)
    return io[position][1][batch["attention_mask"].bool()]
