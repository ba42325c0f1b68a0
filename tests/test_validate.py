"""Edge validation: device profiles, budget maths, analytic vs measured memory, fit verdicts.

Measured runs happen in a subprocess (a few seconds each for imports), so the checkpoints used
for them are saved once per module. Memory tolerance (stated in docs/PERFORMANCE.md): on CPU the
measured peak RSS growth is within 10% + 32 MiB of the analytic estimate. The probe warms the
runtime up before its baseline, so the gap measured here is a few MiB of allocator slack; before
that warm-up it was 15-25 MiB, and 42 MiB (past the tolerance) in two full-suite runs.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import TINY_DATA, tiny_job
from tiny_models import tiny_gpt2, tiny_llama, tiny_tokenizer
from transformers import GPT2Config, GPT2ForSequenceClassification

from runner.cli.validate import EXIT_BAD_INPUT, EXIT_DOES_NOT_FIT, EXIT_FITS
from runner.cli.validate import main as validate_cli
from runner.config import parse_config
from runner.devices import (
    DeviceError,
    available_devices,
    budget_bytes,
    load_device,
    resolve_budget,
)
from runner.validate import (
    ValidationFailed,
    check_fits,
    params_for_budget,
    validate_checkpoint,
    validate_for_job,
)
from stages import memory_model as mm
from stages.arch import get_adapter
from stages.budget import stage_budget
from stages.checkpoint import load_pruned, save_checkpoint

MIB = 1024**2
DEVICES = {  # name -> bandwidth in bytes/s (DESIGN.md facts)
    "dgx_spark": 273e9,
    "jetson_agx_orin_64gb": 204.8e9,
    "jetson_orin_nx_16gb": 102.4e9,
    "jetson_orin_nano_8gb": 68e9,
}
NANO = "jetson_orin_nano_8gb"


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    """~33M-param random GPT-2 (134 MB fp32, weights dominate the RSS noise) and a pruned copy."""
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=512,
        n_layer=8,
        n_head=8,
        vocab_size=16000,
        n_positions=256,
        num_labels=3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = GPT2ForSequenceClassification(config).eval()
    root = tmp_path_factory.mktemp("gpt2")
    dense = save_checkpoint(model, None, root / "dense")
    adapter = get_adapter(model)
    adapter.remove_layers(model, [2, 5])
    for layer in range(6):
        adapter.prune_mlp(model, layer, list(range(0, 2048, 2)))
    pruned = save_checkpoint(model, None, root / "pruned")
    return dense, pruned, model


@pytest.fixture(scope="module")
def measured(gpt2_pair):
    """Both checkpoints measured in subprocesses (the slow part of this file: two probes)."""
    dense, pruned, _ = gpt2_pair
    return validate_checkpoint(
        pruned, NANO, fraction=0.5, batch=2, seq_len=128, dense_path=dense, repeats=2
    )


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    model = tiny_gpt2()
    return save_checkpoint(model, tiny_tokenizer(), tmp_path_factory.mktemp("tiny") / "ckpt")


# ---- device profiles and budgets --------------------------------------------------------------
def test_every_builtin_profile_parses_with_the_design_facts():
    assert set(available_devices()) == set(DEVICES)
    for name, bandwidth in DEVICES.items():
        profile = load_device(name)
        assert profile.name == name
        assert profile.bandwidth_bytes_per_s == pytest.approx(bandwidth)
        assert 0 < profile.usable_bytes < profile.visible_bytes <= profile.memory_bytes
        assert profile.bf16_flops > 1e12 and profile.source
    spark = load_device("dgx_spark")
    assert spark.os_reserve_bytes >= 8 * 1024**3
    assert 119 * 1024**3 <= spark.visible_bytes <= 121 * 1024**3


def test_unknown_device_names_the_available_ones():
    with pytest.raises(DeviceError, match=r"unknown device 'pi5'.*dgx_spark.*jetson_orin_nano_8gb"):
        load_device("pi5")


def test_user_profile_yaml_is_checked_strictly(tmp_path):
    facts = yaml.safe_load(load_device(NANO).model_dump_json())
    good = tmp_path / "my_board.yaml"
    good.write_text(yaml.safe_dump(facts | {"name": "my_board"}))
    assert load_device(str(good)).name == "my_board"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(facts | {"bandwith": 1}))
    with pytest.raises(DeviceError, match="bandwith: unknown key"):
        load_device(bad)
    worse = tmp_path / "worse.yaml"
    worse.write_text(yaml.safe_dump(facts | {"os_reserve_bytes": facts["visible_bytes"]}))
    with pytest.raises(DeviceError, match="leaves nothing"):
        load_device(worse)


def test_budget_is_visible_minus_reserve_times_fraction_or_explicit_bytes():
    nano = load_device(NANO)
    usable = nano.visible_bytes - nano.os_reserve_bytes
    assert budget_bytes(nano) == usable
    assert budget_bytes(nano, fraction=0.25) == int(usable * 0.25)
    assert budget_bytes(nano, budget_bytes=123_456) == 123_456
    assert resolve_budget(None, None, 1000) == 1000
    assert resolve_budget(NANO, 0.5, None) == int(usable * 0.5)
    with pytest.raises(DeviceError, match="not both"):
        budget_bytes(nano, fraction=0.5, budget_bytes=10)
    with pytest.raises(DeviceError, match="exceeds the device's usable memory"):
        budget_bytes(nano, budget_bytes=usable + 1)
    with pytest.raises(DeviceError, match=r"fraction must be in \(0, 1\]"):
        budget_bytes(nano, fraction=1.5)


# ---- analytic model -----------------------------------------------------------------------------
def test_kv_cache_follows_a_heterogeneous_gqa_layout():
    model = tiny_llama()  # 3 layers, 4 query heads in 2 KV groups, head_dim 8
    get_adapter(model).prune_attention(model, 1, [0])  # layer 1 keeps one KV group
    shape = mm.model_shape(model)
    assert [layer.num_kv_heads for layer in shape.layers] == [2, 1, 2]
    batch, seq, nbytes = 3, 10, 2
    expected = sum(2 * kv * 8 * seq * batch * nbytes for kv in (2, 1, 2))
    assert mm.kv_cache_bytes(shape, batch, seq, nbytes) == expected
    assert (
        mm.weight_bytes(shape, 4)
        == sum(p.numel() for p in model.parameters()) * 4 + shape.buffer_bytes
    )


def test_gpt2_cache_counts_the_fused_qkv_buffer_but_decode_reads_only_k_and_v():
    shape = mm.model_shape(tiny_gpt2())  # 3 layers, 4 heads of 8
    stored = mm.kv_cache_bytes(shape, 1, 16, 4)
    assert stored == 3 * (4 + 2 * 4) * 8 * 16 * 4
    assert mm.kv_cache_bytes(shape, 1, 16, 4, as_stored=False) == 3 * 2 * 4 * 8 * 16 * 4


def test_workspace_and_roofline_formulas_on_a_hand_made_shape():
    layers = (mm.LayerShape(4, 2, 100), mm.LayerShape(4, 2, 10))
    shape = mm.ModelShape(
        family="llama",
        params=1000,
        embedding_params=200,
        buffer_bytes=0,
        hidden=16,
        head_dim=4,
        layers=layers,
        logits_width=3,
        decoder=True,
        eager_attention=False,
    )
    tokens = 2 * 5
    attention = tokens * 4 * (3 * 4 + 2 * 2)  # 640 < mlp 3 * 10 * 100 = 3000
    elements = 3 * tokens * 16 + 3 * tokens * 100 + tokens * 3
    assert mm.workspace_bytes(shape, 2, 5, 2) == elements * 2 + 2 * 5 * 5
    assert attention < 3 * tokens * 100
    kv_read = (
        2 * (2 * 2 * 4) * 5 * 2 * 2
    )  # layers x (K+V x kv heads x head_dim) x seq x batch x bytes
    step = 800 * 2 + kv_read
    assert mm.decode_tokens_per_s(shape, 1e9, 2, 5, 2) == pytest.approx(2 * 1e9 / step)
    roof = mm.roofline(shape, 1e9, 1e12, 2, 5, 2)
    assert roof["tokens_per_s_realistic"] == pytest.approx(0.6 * roof["tokens_per_s"])
    flops = 2 * 800 * tokens + 2 * (4 * 2 * 25 * 4 * 4)
    assert mm.forward_flops(shape, 2, 5) == flops
    assert roof["samples_per_s"] == pytest.approx(2 / max(flops / 1e12, 2000 / 1e9))


def test_meta_model_of_a_pruned_checkpoint_has_the_real_shape(tmp_path):
    model = tiny_llama()
    adapter = get_adapter(model)
    adapter.prune_attention(model, 0, [1])
    adapter.prune_mlp(model, 2, list(range(20)))
    path = save_checkpoint(model, None, tmp_path / "ckpt")
    assert mm.model_shape(mm.meta_model(path)) == mm.model_shape(load_pruned(path))


# ---- measured runs ------------------------------------------------------------------------------
def test_analytic_memory_matches_the_measured_cpu_peak(measured, gpt2_pair):
    _, _, pruned_model = gpt2_pair
    pruned_shape = mm.model_shape(pruned_model)
    analytic = measured["analytic"]["pruned"]
    assert analytic["weights"] == pruned_shape.params * 4 + pruned_shape.buffer_bytes
    for side, peak in (("pruned", measured["peak_bytes"]), ("dense", measured["dense_peak_bytes"])):
        estimate = measured["analytic"][side]
        assert peak >= estimate["weights"] + estimate["kv_cache"], side  # must all be resident
        assert abs(peak - estimate["total"]) <= 0.10 * estimate["total"] + 32 * MIB, (
            side,
            peak,
            estimate,
        )
    assert measured["fits"] and measured["fits_basis"] == "measured"
    assert measured["headroom_bytes"] == measured["budget_bytes"] - measured["peak_bytes"]


def test_dense_comparison_reports_measured_reductions_and_rooflines(measured):
    assert measured["dense_peak_source"] == "measured"
    assert 0.2 < measured["reductions"]["peak_memory"] < 0.6  # ~44% fewer parameters
    assert measured["latency_ms"]["dense"] > 0 and measured["latency_ms"]["pruned"] > 0
    tokens = measured["projected_tokens_per_s"]
    assert tokens["pruned"] > tokens["dense"] > 0  # fewer bytes per decoded token
    realistic = measured["projected_tokens_per_s_realistic"]
    assert realistic["pruned"] == pytest.approx(0.6 * tokens["pruned"])


def test_budget_below_the_measured_peak_is_a_does_not_fit(measured, gpt2_pair, monkeypatch):
    import runner.validate as validate

    _, pruned, _ = gpt2_pair
    replay = {
        "oom": False,
        "peak_bytes": measured["peak_bytes"],
        "latency_ms": 1.0,
        "device": "cpu",
    }
    monkeypatch.setattr(validate, "measure_inference", lambda ref, **kw: dict(replay))
    budget = int(measured["peak_bytes"] * 0.85)
    result = validate_checkpoint(pruned, NANO, budget_bytes=budget, batch=2, seq_len=128)
    assert result["fits"] is False and result["fits_basis"] == "measured"
    assert result["headroom_bytes"] == budget - measured["peak_bytes"] < 0
    with pytest.raises(ValidationFailed, match=r"GiB \(\d+\.\d%\) over"):
        check_fits(result)
    check_fits(measured)  # fits: no exception
    oom = dict(
        replay, oom=True, peak_bytes=None
    )  # what a CUDA run past its memory fraction returns
    monkeypatch.setattr(validate, "measure_inference", lambda ref, **kw: dict(oom))
    result = validate_checkpoint(pruned, NANO, budget_bytes=budget, batch=2, seq_len=128)
    assert result["fits"] is False and result["fits_basis"] == "oom"
    with pytest.raises(ValidationFailed, match="ran out of memory"):
        check_fits(result)


def test_analytic_only_uses_the_recorded_dense_params(tmp_path, tiny_checkpoint):
    dense = load_pruned(tiny_checkpoint)
    pruned = load_pruned(tiny_checkpoint)
    get_adapter(pruned).remove_layers(pruned, [1])
    meta = {"dense_params": sum(p.numel() for p in dense.parameters())}
    path = save_checkpoint(pruned, None, tmp_path / "pruned", metadata=meta)
    analytic = validate_checkpoint(path, NANO, seq_len=32, measure=False)
    assert analytic["dense_peak_source"] == "analytic" and analytic["measured_peak_bytes"] is None
    assert analytic["peak_bytes"] == analytic["analytic_bytes"]  # the verdict's basis
    assert analytic["params"]["dense"] == meta["dense_params"]
    assert 0 < analytic["reductions"]["peak_memory"] < 1
    assert analytic["latency_ms"] == {"dense": None, "pruned": None}


# ---- planner and job hooks ----------------------------------------------------------------------
def test_planner_gets_the_largest_param_count_that_fits():
    model = tiny_gpt2()
    shape = mm.model_shape(model)
    cfg = parse_config(tiny_job(target={"device": NANO, "fraction": 9e-5}))
    budget = int(load_device(NANO).usable_bytes * 9e-5)
    est = mm.estimate_memory(shape, 1, cfg.models[0].max_length, 4)
    expected = (budget - est.kv_cache - est.workspace - shape.buffer_bytes) // 4
    assert 0 < expected < shape.params
    target = params_for_budget(model, cfg.target, cfg)
    assert target == expected
    step = stage_budget(
        ratio=None,
        count=None,
        share=0.5,
        total_units=12,
        params_now=shape.params,
        params_target=target,
        remaining_shares=1.0,
    )
    assert step.params == round((shape.params - target) * 0.5)
    roomy = parse_config(tiny_job(target={"device": NANO, "fraction": 0.5}))
    assert params_for_budget(model, roomy.target, roomy) == shape.params
    tiny = parse_config(tiny_job(target={"device": NANO, "budget_bytes": 1000}))
    with pytest.raises(ValidationFailed, match="below the KV cache"):
        params_for_budget(model, tiny.target, tiny)


def test_validate_for_job_without_measuring(monkeypatch, tiny_checkpoint):
    monkeypatch.setenv("CASCADE_VALIDATE_MEASURE", "0")
    cfg = parse_config(tiny_job(target={"device": NANO, "fraction": 0.1}))
    model = load_pruned(tiny_checkpoint)
    params = sum(p.numel() for p in model.parameters())
    result = validate_for_job(model, 2 * params, cfg, cfg.models[0])
    assert result["fits"] and result["fits_basis"] == "analytic"
    assert result["workload"] == {
        "batch": 1,
        "seq_len": cfg.models[0].max_length,
        "dtype": "float32",
    }
    assert result["params"] == {"pruned": params, "dense": 2 * params}
    assert {
        "device",
        "budget_bytes",
        "peak_bytes",
        "dense_peak_bytes",
        "latency_ms",
        "projected_tokens_per_s",
    } <= set(result)


# ---- command line -------------------------------------------------------------------------------
def test_cli_exit_status_fits_does_not_fit_and_bad_input(tiny_checkpoint, capsys):
    args = [str(tiny_checkpoint), "--device", NANO, "--seq-len", "32", "--analytic-only"]
    assert validate_cli([*args, "--fraction", "0.01"]) == EXIT_FITS
    assert "FITS" in capsys.readouterr().out
    assert validate_cli([*args, "--fraction", "1e-6", "--json"]) == EXIT_DOES_NOT_FIT
    result = json.loads(capsys.readouterr().out)
    assert result["fits"] is False and result["headroom_bytes"] < 0
    assert validate_cli([str(tiny_checkpoint), "--device", "pi5"]) == EXIT_BAD_INPUT
    assert "available devices" in capsys.readouterr().err
    assert validate_cli([*args, "--seq-len", "4096"]) == EXIT_BAD_INPUT
    with pytest.raises(SystemExit) as exc:
        validate_cli([*args, "--fraction", "0.5", "--budget-bytes", "10"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_job_on_a_device_target_plans_the_compression_and_reports_validation(tmp_path, monkeypatch):
    from runner.job import run_job
    from runner.models import load_model

    monkeypatch.setenv("CASCADE_VALIDATE_MEASURE", "0")  # CPU runtime overhead dwarfs a KiB budget
    from runner.data.bearing import DataConfig

    dense, _ = load_model("demo-tiny-gpt2", progress=False, data_cfg=DataConfig(**TINY_DATA))
    shape = mm.model_shape(dense)
    est = mm.estimate_memory(shape, 1, 96, 4)
    budget = est.total - int(0.4 * shape.params) * 4  # room for ~60% of the dense weights
    raw = tiny_job(target={"device": NANO, "budget_bytes": budget})
    report = run_job(parse_config(raw), tmp_path / "job", log=lambda m: None)["demo-tiny-gpt2"]
    validation = report["validation"]
    assert validation["device"] == NANO and validation["budget_bytes"] == budget
    assert report["final"]["params"] <= params_for_budget(
        dense, parse_config(raw).target, parse_config(raw)
    )
    assert validation["fits"] and validation["fits_basis"] == "analytic"
    events = [json.loads(x) for x in (tmp_path / "job" / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "validate" and e["fits"] for e in events)


def test_a_model_that_does_not_fit_fails_the_job_after_writing_the_report(tmp_path, monkeypatch):
    from runner.job import run_job
    from runner.validate import ValidationFailed

    monkeypatch.setenv("CASCADE_VALIDATE_MEASURE", "0")
    raw = tiny_job(target={"ratio": 1.6, "device": NANO, "budget_bytes": 4096})
    with pytest.raises(ValidationFailed, match="over"):
        run_job(parse_config(raw), tmp_path / "job", log=lambda m: None)
    report = json.loads((tmp_path / "job" / "report.json").read_text())
    assert report["validation"]["fits"] is False and report["validation"]["budget_bytes"] == 4096
    assert (tmp_path / "job" / "checkpoint" / "manifest.json").is_file()
    events = [json.loads(x) for x in (tmp_path / "job" / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "error" and events[-1]["stage"] == "validate"
