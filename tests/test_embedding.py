"""Embedding task: bare encoders, dense-embedding distillation, cosine-to-dense reporting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_job
from tiny_models import tiny_bert
from transformers import BertModel

from runner.checkpoint import load_pruned
from runner.config import ConfigError, parse_config
from runner.data import DataConfig, build_dataset
from runner.job import run_job
from runner.models import ModelError, build_tokenizer, load_model
from stages.objective import (
    embedding_loss,
    mean_pool,
    nearest_neighbour_predictions,
    summed_loss,
    task_loss,
)
from stages.training import encode_split, evaluate, predict


# ----------------------------------------------------------------------------- pure maths
def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_embedding_loss_is_minimal_at_the_teacher_but_not_flat() -> None:
    torch.manual_seed(0)
    dense = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    student = dense.clone().requires_grad_(True)
    at_teacher = embedding_loss(student, dense)
    at_teacher.backward()
    # the contrastive term keeps a gradient at the dense model (Taylor importance needs one)
    assert student.grad.abs().sum() > 0
    shuffled = dense[torch.tensor([1, 0, 3, 2, 5, 4])]
    assert embedding_loss(shuffled, dense) > at_teacher + 1.0
    rows = embedding_loss(dense, dense, reduction="sum")
    assert torch.isclose(rows, at_teacher.detach() * 6, rtol=1e-5)


def test_task_loss_switches_on_targets() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    batch = {"labels": torch.tensor([0, 1])}
    assert torch.isclose(
        task_loss(logits, batch), torch.nn.functional.cross_entropy(logits, batch["labels"])
    )
    with_targets = batch | {"targets": logits}
    assert torch.isclose(task_loss(logits, with_targets), embedding_loss(logits, logits))


def test_nearest_neighbour_is_leave_one_out() -> None:
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    assert nearest_neighbour_predictions(emb, labels).tolist() == [0, 0, 1, 1]
    # a row never matches itself: with its only same-class partner elsewhere it is misclassified
    assert nearest_neighbour_predictions(emb, torch.tensor([0, 1, 1, 0])).tolist() == [1, 0, 0, 1]


# ----------------------------------------------------------------------------- model + splits
def _texts() -> list[str]:
    data = build_dataset(DataConfig(samples_per_class_per_load=2, calibration_size=8))
    return [t for split in data.values() for t in split["text"]]


def save_tiny_encoder(path: Path) -> Path:
    """A tiny BERT sentence encoder checkpoint with a tokenizer covering the bearing vocabulary."""
    tok = build_tokenizer(_texts())
    model = tiny_bert(BertModel, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_load_model_embedding_gives_bare_encoder(tmp_path) -> None:
    path = save_tiny_encoder(tmp_path / "enc")
    model, _ = load_model(str(path), task="embedding")
    assert isinstance(model, BertModel) and model.pooler is None
    with pytest.raises(ModelError, match="demo models are classifiers"):
        load_model("demo-tiny-gpt2", task="embedding")


def test_evaluate_reports_cosine_to_dense(tmp_path) -> None:
    path = save_tiny_encoder(tmp_path / "enc")
    model, tok = load_model(str(path), task="embedding")
    data = build_dataset(DataConfig(samples_per_class_per_load=2, calibration_size=8))
    split = encode_split(data["test"], tok, 64)
    split = split.with_targets(predict(model, split))
    dense = evaluate(model, split)
    assert dense.cosine == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= dense.accuracy <= 1.0 and dense.n == len(split)
    with torch.no_grad():  # damage one layer: cosine must drop below 1
        model.encoder.layer[0].output.dense.weight.mul_(-3.0)
    assert evaluate(model, split).cosine < 0.99
    batch = next(split.batches(4))
    with torch.no_grad():
        assert "targets" in batch and float(summed_loss(model, batch)) > 0


# ----------------------------------------------------------------------------- config
def test_embedding_config_rejects_classifier_options() -> None:
    raw = tiny_job("x", task="embedding")
    raw["models"] = [{"ref": "x", "finetune_steps": 5}]
    raw["stages"][1]["loss"] = "kd"
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    text = str(err.value)
    assert "stages.1 (recover1): loss kd" in text and "models.0.finetune_steps" in text


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_embedding_job_distils_and_reports_cosine(tmp_path) -> None:
    path = save_tiny_encoder(tmp_path / "enc")
    raw = tiny_job(str(path), task="embedding")
    (report,) = run_job(parse_config(raw), tmp_path / "out", log=lambda m: None).values()
    final = report["final"]
    assert report["model"]["architecture"] == "BertModel"
    assert final["params"] < final["dense_params"]
    assert final["dense_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 < final["cosine"] < 1.0 and 0.0 < final["heldout_cosine"] < 1.0
    assert all(r["cosine"] is not None for r in report["stages"])
    exported = load_pruned(tmp_path / "out" / "checkpoint")
    assert isinstance(exported, BertModel)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "cosine similarity to the dense embeddings" in md
    html = (tmp_path / "out" / "report.html").read_text()
    assert f"{final['cosine']:.4f}" in html
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["final"]["cosine"] == pytest.approx(final["cosine"])


@pytest.mark.slow
@pytest.mark.ray
def test_embedding_job_on_ray_matches_local_scores(tmp_path) -> None:
    """Dense targets travel with the calibration shards and the Ray Train split."""
    path = save_tiny_encoder(tmp_path / "enc")
    local = tmp_path / "local"
    run_job(parse_config(tiny_job(str(path), task="embedding")), local, log=lambda m: None)
    raw = tiny_job(str(path), task="embedding", cluster={"executor": "ray", "workers": 2})
    raw["stages"][-1] |= {"runner": "ray_train"}
    (report,) = run_job(parse_config(raw), tmp_path / "ray", log=lambda m: None).values()
    for stage in ("00_layers", "02_heads", "04_channels"):
        a = json.loads((local / "stages" / stage / "plan.json").read_text())
        b = json.loads((tmp_path / "ray" / "stages" / stage / "plan.json").read_text())
        assert a["keep"] == b["keep"] and a["drop_layers"] == b["drop_layers"], stage
    assert 0.0 < report["final"]["cosine"] < 1.0


def test_sia_command_measures_the_distillation_loss(tmp_path) -> None:
    import math

    from runner.sia_report import sia_for_config

    path = save_tiny_encoder(tmp_path / "enc")
    cfg = parse_config(tiny_job(str(path), task="embedding"))
    (result,) = sia_for_config(cfg, log=lambda m: None).values()
    assert result["model"]["architecture"] == "BertModel"
    assert math.isfinite(result["score"])
    assert set(result["per_granularity"]) == {"heads", "channels"}
