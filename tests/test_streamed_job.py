"""`calibration.streamed: true` in a job: the prune stages run layer-streamed and make the plans
the in-memory job makes; what the streamed path cannot do is refused up front."""

from __future__ import annotations

import json

import pytest
import torch
from test_causal_lm import lm_job, lm_workspace

from runner.config import ConfigError, parse_config
from runner.job import run_job
from stages.checkpoint import load_pruned

STAGES = [
    {"kind": "layers", "criterion": "block_influence", "count": 1},
    {"kind": "heads", "criterion": "wanda", "share": 0.5, "compensate": "lsq"},
    {
        "kind": "channels",
        "criterion": "fluctuation",
        "share": 0.5,
        "compensate": "lsq",
        "compensate_inputs": "parallel",
    },
    # CE: a causal LM's default is KD from the dense model, which the streamed path never holds
    {"kind": "recover", "steps": 2, "batch_size": 4, "loss": "ce"},
]


def test_streamed_jobs_refuse_what_needs_the_whole_model(tmp_path) -> None:
    raw = lm_job(tmp_path)
    raw["calibration"]["streamed"] = True
    raw["guards"] = {"max_accuracy_drop": 0.5}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)  # lm_job: taylor heads stage, recoveries between prune stages
    text = str(err.value)
    assert "stages.2.criterion: taylor needs the whole model" in text and "use wanda" in text
    assert "stages.2 (heads): calibration.streamed runs every prune stage before any" in text
    assert "guards.max_accuracy_drop" in text


@pytest.mark.slow
def test_streamed_job_makes_the_in_memory_plans(tmp_path) -> None:
    root = lm_workspace(tmp_path / "lm")
    raw = lm_job(root) | {"stages": STAGES, "sia": {"enabled": False}}
    streamed = json.loads(json.dumps(raw))
    streamed["calibration"]["streamed"] = True
    (memory,) = run_job(parse_config(raw), tmp_path / "memory", log=lambda m: None).values()
    (report,) = run_job(parse_config(streamed), tmp_path / "stream", log=lambda m: None).values()
    for stage in ("00_layers", "01_heads", "02_channels"):
        a = json.loads((tmp_path / "memory" / "stages" / stage / "plan.json").read_text())
        b = json.loads((tmp_path / "stream" / "stages" / stage / "plan.json").read_text())
        assert a["keep"] == b["keep"] and a["drop_layers"] == b["drop_layers"], stage
        assert a["compensation"] == b["compensation"], stage
    for run in ("memory", "stream"):  # the refit tensors beside the compensated stages' plans
        for stage in ("01_heads", "02_channels"):
            assert (tmp_path / run / "stages" / stage / "refit.safetensors").is_file()
    assert report["final"]["params"] == memory["final"]["params"]
    assert report["final"]["dense_accuracy"] is None and "streamed run" in report["warnings"][0]
    a = load_pruned(tmp_path / "memory" / "checkpoint").state_dict()
    b = load_pruned(tmp_path / "stream" / "checkpoint").state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4  # same cut, same recovery
    assert torch.isfinite(torch.tensor(report["final"]["lm_perplexity"]))
