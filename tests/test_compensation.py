"""Closed-form compensation: the fit's maths by hand and brute force, and on tiny models that a
cut of nothing is exact, that the refit never raises the calibration output error, and that
the in-memory job path, two stream workers, the streamed run and an independent full-model
reference refit the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_job
from tiny_models import padded_batch, tiny_bert, tiny_gpt2, tiny_llama

from cluster.compensate_model import compensate_model
from cluster.layer_passes import LocalLayerPasses, compensate
from cluster.stream_prune import stream_prune
from runner.config import parse_config
from runner.preflight import PreflightError, preflight
from stages.arch import get_adapter
from stages.base import PrunePlan, apply_plan
from stages.compensation import CompensationSettings, Refit, fit_layer, layer_sums
from stages.importance import unit_columns
from stages.prune_stage import PruneStage
from stages.stage_plan import PlanLimits
from stages.streaming.worker import StreamSpec


def _sums(x_d, y_d, x_p=None):
    return layer_sums(x_d, y_d, x_p)


def _brute_error(x_p, weight, bias, x_d, w, b):
    y = x_d.double() @ w.double().T + (b.double() if b is not None else 0)
    y_fit = x_p.double() @ weight.double().T + (bias.double() if bias is not None else 0)
    return float((y_fit - y).square().sum() / y.square().sum())


# ---- the fit --------------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [False, True])
def test_a_cut_of_nothing_refits_to_the_same_weights(with_bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=gen)
    w, b = torch.randn(4, 6, generator=gen), torch.randn(4, generator=gen) if with_bias else None
    y = x @ w.T + (b if b is not None else 0)
    fit = fit_layer(w, b, torch.arange(6), _sums(x, y), CompensationSettings("lsq", "parallel"))
    torch.testing.assert_close(fit.weight, w.double(), rtol=0, atol=1e-9)
    if with_bias:
        torch.testing.assert_close(fit.bias, b.double(), rtol=0, atol=1e-9)
    assert fit.error_before == pytest.approx(0.0, abs=1e-6)  # float32 sums: ~1e-8 noise


@pytest.mark.parametrize("method", ["lsq", "bias"])
@pytest.mark.parametrize("inputs", ["parallel", "sequential"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("ridge", [1e-6, 1e-2, 10.0])
def test_the_refit_never_raises_the_output_error(method, inputs, with_bias, ridge):
    gen = torch.Generator().manual_seed(1)
    x_d = torch.randn(80, 8, generator=gen) + 0.5
    x_d[:, 3] = 0.7 * x_d[:, 0] - x_d[:, 5]  # correlated columns, as real activations
    w, b = torch.randn(5, 8, generator=gen), torch.randn(5, generator=gen) if with_bias else None
    y = x_d @ w.T + (b if b is not None else 0)
    keep = torch.tensor([0, 1, 4, 5, 7])
    x_p = x_d[:, keep] + 0.1 * torch.randn(80, 5, generator=gen) if inputs == "sequential" else None
    settings = CompensationSettings(method, inputs, ridge)
    fit = fit_layer(
        w, b, keep, _sums(x_d, y, x_p), settings, add_bias=method == "bias" and b is None
    )
    assert fit.error_after <= fit.error_before + 1e-12
    x_used = x_p if x_p is not None else x_d[:, keep]
    new_w = fit.weight if fit.weight is not None else w[:, keep]
    brute_before = _brute_error(x_used, w[:, keep], b, x_d, w, b)
    brute_after = _brute_error(x_used, new_w, fit.bias if fit.bias is not None else b, x_d, w, b)
    assert fit.error_before == pytest.approx(brute_before, rel=1e-5)  # float32 sums
    assert fit.error_after == pytest.approx(brute_after, rel=1e-5, abs=1e-7)
    if method == "bias":
        assert fit.weight is None and fit.bias is not None


def test_bias_with_parallel_inputs_is_flaps_baseline_compensation():
    """delta b = W[:, removed] @ mean(x[removed]): exact where removed inputs are constant."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(10, 4, generator=gen)
    x[:, 1], x[:, 3] = 0.7, -1.3
    linear = torch.nn.Linear(4, 3)
    with torch.no_grad():  # seeded weights; the sums are float32, hence the tolerances below
        linear.weight.copy_(torch.randn(3, 4, generator=gen))
        linear.bias.copy_(torch.randn(3, generator=gen))
        y = linear(x)
    keep = torch.tensor([0, 2])
    fit = fit_layer(
        linear.weight, linear.bias, keep, _sums(x, y), CompensationSettings("bias", "parallel")
    )
    removed = torch.tensor([1, 3])
    flap = linear.weight.detach()[:, removed].double() @ x[:, removed].double().mean(0)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fit.bias - linear.bias.detach().double(), flap, **tol)
    with torch.no_grad():
        restored = x[:, keep].double() @ linear.weight[:, keep].double().T + fit.bias
        torch.testing.assert_close(restored, y.double(), **tol)


def test_lsq_recovers_a_removed_column_the_kept_ones_span():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(60, 5, generator=gen)
    x[:, 4] = x[:, 0] - 2 * x[:, 2]
    w = torch.randn(3, 5, generator=gen)
    fit = fit_layer(
        w, None, torch.arange(4), _sums(x, x @ w.T), CompensationSettings("lsq", "parallel", 1e-9)
    )
    assert fit.error_before > 1e-2 and fit.error_after < 1e-8


def test_sums_add_over_micro_batches():
    gen = torch.Generator().manual_seed(4)
    x, x_p = torch.randn(30, 6, generator=gen), torch.randn(30, 4, generator=gen)
    y = torch.randn(30, 3, generator=gen)
    whole = layer_sums(x, y, x_p)
    parts = [layer_sums(x[s], y[s], x_p[s]) for s in (slice(0, 13), slice(13, 30))]
    for key, value in whole.items():
        torch.testing.assert_close(parts[0][key] + parts[1][key], value, rtol=1e-5, atol=1e-5)


def test_refit_spills_to_disk_and_reads_back(tmp_path):
    refit = Refit({1: {"weight": torch.ones(2, 3)}, 4: {"bias": torch.arange(2.0)}})
    refit.spill(tmp_path / "r.safetensors")
    assert refit.layers() == [1, 4]
    assert torch.equal(refit.get(4)["bias"], torch.arange(2.0))
    again = Refit.load(tmp_path / "r.safetensors")
    assert torch.equal(again.get(1)["weight"], torch.ones(2, 3)) and again.get(2) == {}


# ---- on a tiny model ----------------------------------------------------------------------
def calibration(n: int = 5) -> list[dict]:
    out = []
    for seed in range(n):
        ids, mask = padded_batch(batch=3, seq_len=9, seed=seed)
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def channel_plan(model, keep_per_layer: dict[int, list[int]]) -> PrunePlan:
    adapter = get_adapter(model)
    n = len(adapter.layers(model))
    units = [adapter.mlp_units(model, i) for i in range(n)]
    keep = {i: keep_per_layer.get(i, list(range(units[i]))) for i in range(n)}
    return PrunePlan(
        stage="channels", granularity="channels", criterion="wanda", version_in=0,
        params_before=0, params_to_remove=0, keep=keep, scores=[[0.0] * u for u in units],
    )  # fmt: skip


def stage(method="lsq", inputs="sequential", kind="channels") -> PruneStage:
    criterion = "block_influence" if kind == "layers" else "wanda"
    return PruneStage(
        kind=kind, criterion=criterion, count=1, compensate=method, compensate_inputs=inputs
    )


def test_a_compensated_cut_of_nothing_leaves_the_model_exact():
    model = tiny_llama()
    reference = copy.deepcopy(model)
    plan = channel_plan(model, {})
    compensate_model(model, get_adapter(model), plan, stage(), calibration())
    assert plan.refit.layers() == [] and plan.compensation["layers"] == {}
    apply_plan(model, get_adapter(model), plan)
    ids, mask = padded_batch(seed=9)
    with torch.no_grad():
        assert torch.equal(
            model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits
        )


KEEP = {0: list(range(0, 48, 2)), 2: list(range(10, 40))}


@pytest.mark.parametrize("inputs", ["sequential", "parallel"])
def test_every_refit_layer_lowers_its_calibration_error(inputs):
    model = tiny_llama()
    plan = channel_plan(model, KEEP)
    compensate_model(model, get_adapter(model), plan, stage("lsq", inputs), calibration())
    layers = plan.compensation["layers"]
    assert sorted(layers) == ["0", "2"] and plan.refit.layers() == [0, 2]
    for errors in layers.values():
        assert errors["error_after"] < errors["error_before"]
    assert plan.refit.get(0)["weight"].shape == (32, 24)


def test_one_worker_two_workers_and_streamed_refit_the_same(tmp_path):
    model = tiny_llama(attn_implementation="sdpa")
    source = tmp_path / "src"
    model.save_pretrained(source)
    memory = channel_plan(model, KEEP)
    compensate_model(model, get_adapter(model), memory, stage(), calibration())
    two = channel_plan(model, KEEP)
    passes = LocalLayerPasses(StreamSpec(str(source), attn_implementation="sdpa"), calibration(), 2)
    try:
        compensate(passes, (), two, stage().compensation, adds_bias=False)
    finally:
        passes.close()
    assert two.compensation == memory.compensation
    for layer in memory.refit.layers():
        assert torch.equal(two.refit.get(layer)["weight"], memory.refit.get(layer)["weight"])
    # a whole streamed run with a compensated channels stage writes the same model
    streamed = stream_prune(
        source, tmp_path / "out", [stage()], calibration(), limits=PlanLimits(),
        attn_implementation="sdpa", log=lambda _: None,
    )  # fmt: skip
    assert streamed[0].compensation["method"] == "lsq"


def _grab(adapter, dense, work, i: int, batch: dict) -> dict:
    """Layer i's out-projection input/output in the dense model, input in the cut one."""
    mask = batch["attention_mask"].bool()
    grab = {}
    dense_proj = adapter.out_proj(adapter.layers(dense)[i], "channels")
    cut_proj = adapter.out_proj(adapter.layers(work)[i], "channels")
    handles = [
        dense_proj.register_forward_pre_hook(lambda m, a: grab.__setitem__("xd", a[0][mask])),
        dense_proj.register_forward_hook(lambda m, a, o: grab.__setitem__("yd", o[mask])),
        cut_proj.register_forward_pre_hook(lambda m, a: grab.__setitem__("xp", a[0][mask])),
    ]
    with torch.no_grad():
        dense(**batch)
        work(**batch)
    for h in handles:
        h.remove()
    return grab


def _full_model_sequential_reference(model, plan, batches, settings):
    """Independent of the layer carrying: every layer's inputs from full forwards with hooks."""
    adapter = get_adapter(model)
    dense = copy.deepcopy(model)
    work = copy.deepcopy(model)
    refits = {}
    for i in sorted(plan.keep):
        keep = plan.keep[i]
        if len(keep) == adapter.mlp_units(work, i):
            continue
        adapter.prune_mlp(work, i, keep)
        sums = {}
        for batch in batches:
            grab = _grab(adapter, dense, work, i, batch)
            for key, value in layer_sums(grab["xd"], grab["yd"], grab["xp"]).items():
                sums[key] = sums[key] + value if key in sums else value
        proj = adapter.out_proj(adapter.layers(dense)[i], "channels")
        fit = fit_layer(proj.weight, proj.bias, unit_columns(keep, 1), sums, settings)
        with torch.no_grad():
            adapter.out_proj(adapter.layers(work)[i], "channels").weight.copy_(fit.weight.float())
        refits[i] = fit.weight.float()
    return refits


def test_sequential_refit_matches_a_full_model_reference():
    """The streamed pass carries two hidden states; full forwards with hooks must agree."""
    model = tiny_llama(attn_implementation="eager")
    plan = channel_plan(model, KEEP)
    compensate_model(model, get_adapter(model), plan, stage(), calibration())
    want = _full_model_sequential_reference(model, plan, calibration(), stage().compensation)
    for layer, weight in want.items():
        torch.testing.assert_close(plan.refit.get(layer)["weight"], weight, rtol=1e-4, atol=1e-5)


def test_heads_and_a_biased_family_compensate_and_replay(tmp_path):
    """GPT-2 (Conv1D, biased c_proj): lsq refits weight and intercept; the plan replays."""
    model = tiny_gpt2()
    adapter = get_adapter(model)
    n = len(adapter.layers(model))
    heads = [adapter.attn_units(model, i) for i in range(n)]
    plan = PrunePlan(
        stage="heads", granularity="heads", criterion="wanda", version_in=0, params_before=0,
        params_to_remove=0, keep={i: [0, 2] if i == 1 else list(range(heads[i])) for i in range(n)},
        scores=[[0.0] * h for h in heads],
    )  # fmt: skip
    replay = copy.deepcopy(model)
    compensate_model(model, adapter, plan, stage("lsq", kind="heads"), calibration())
    fitted = plan.refit.get(1)
    assert set(fitted) == {"weight", "bias"} and fitted["weight"].shape == (32, 16)
    apply_plan(model, adapter, plan)
    plan.save(tmp_path / "plan.json")
    apply_plan(replay, adapter, PrunePlan.load(tmp_path / "plan.json"))
    for a, b in zip(model.state_dict().values(), replay.state_dict().values()):
        assert torch.equal(a, b)


def test_the_job_file_refuses_compensating_a_layers_stage_and_reads_the_old_flag():
    with pytest.raises(ValueError, match="use compensate: none"):
        stage(kind="layers")
    old = PruneStage.model_validate(
        {"kind": "channels", "criterion": "fluctuation", "count": 2, "bias_compensation": True}
    )
    assert (old.compensate, old.compensate_inputs) == ("bias", "parallel")


def test_a_family_the_layer_pass_cannot_run_is_refused_before_anything_is_cut():
    raw = tiny_job(
        stages=[{"kind": "channels", "criterion": "wanda", "count": 2, "compensate": "lsq"}]
    )
    cfg = parse_config(raw, "job.yaml")
    model = tiny_bert(num_labels=10)
    with pytest.raises(PreflightError, match=r"stages\.0\.compensate: lsq .* model type bert"):
        preflight(cfg, "tiny-bert", model, get_adapter(model), 10**6, None)
    llama = tiny_llama()
    preflight(cfg, "tiny-llama", llama, get_adapter(llama), 10**6, None)  # streamable: accepted
