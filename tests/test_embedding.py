"""Embedding task: bare encoders, dense-embedding distillation, cosine-to-dense reporting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_job
from tiny_models import tiny_bert
from transformers import BertModel

from runner.config import ConfigError, parse_config
from runner.data.bearing import DataConfig, build_dataset
from runner.demo_models import build_tokenizer
from runner.job import run_job
from runner.models import ModelError, load_model
from stages.checkpoint import load_pruned, save_checkpoint
from stages.objectives import get_objective
from stages.objectives.embedding import (
    embedding_loss,
    embedding_sensitivity_loss,
    mean_pool,
    nearest_neighbour_predictions,
)
from stages.split import encode_split

EMBED = get_objective("embedding")


# ----------------------------------------------------------------------------- pure maths
def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def _clustered_unit_vectors(rows: int = 8, dim: int = 16) -> torch.Tensor:
    """Embeddings close together (mean cosine ~0.8), like a sentence encoder's on one domain."""
    gen = torch.Generator().manual_seed(0)
    centre = torch.randn(dim, generator=gen)
    return torch.nn.functional.normalize(
        centre + 0.5 * torch.randn(rows, dim, generator=gen), dim=-1
    )


def test_training_loss_is_minimised_exactly_at_the_dense_embeddings() -> None:
    dense = _clustered_unit_vectors()
    at_teacher = embedding_loss(dense, dense)
    assert float(at_teacher) == pytest.approx(0.0, abs=1e-5)
    # optimising freely from the dense embeddings must not wander off (a contrastive training
    # loss would: it rewards spreading rows the dense model keeps close)
    student = dense.clone().requires_grad_(True)
    optimiser = torch.optim.SGD([student], lr=0.5)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        student.add_(0.05 * torch.randn(dense.shape, generator=noise))
    for _ in range(200):
        optimiser.zero_grad()
        embedding_loss(student, dense).backward()
        optimiser.step()
    cosine = torch.nn.functional.cosine_similarity(student.detach(), dense).mean()
    assert cosine > 0.999
    shuffled = dense[torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])]
    assert embedding_loss(shuffled, dense) > 0.1
    rows = embedding_loss(shuffled, dense, reduction="sum")
    assert torch.isclose(rows, embedding_loss(shuffled, dense) * 8, rtol=1e-5)


def test_importance_loss_has_a_gradient_at_the_dense_embeddings() -> None:
    dense = _clustered_unit_vectors()
    student = dense.clone().requires_grad_(True)
    embedding_loss(student, dense).backward()
    assert student.grad.abs().max() < 1e-5  # the training loss is flat there: Taylor would see 0
    student.grad = None
    embedding_sensitivity_loss(student, dense).backward()
    assert student.grad.abs().sum() > 1e-2


def test_each_objective_has_its_own_loss() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    batch = {"labels": torch.tensor([0, 1])}
    ce = get_objective("classification").loss(logits, batch)
    assert torch.isclose(ce, torch.nn.functional.cross_entropy(logits, batch["labels"]))
    with_targets = batch | {"targets": logits}
    assert torch.isclose(EMBED.loss(logits, with_targets), embedding_loss(logits, logits))


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
    model, _ = load_model(str(path), head="encoder")
    assert isinstance(model, BertModel) and model.pooler is None
    with pytest.raises(ModelError, match="demo models are classifiers"):
        load_model("demo-tiny-gpt2", head="encoder")


def test_evaluate_reports_cosine_to_dense(tmp_path) -> None:
    path = save_tiny_encoder(tmp_path / "enc")
    model, tok = load_model(str(path), head="encoder")
    data = build_dataset(DataConfig(samples_per_class_per_load=2, calibration_size=8))
    split = EMBED.dense_targets(model, encode_split(data["test"], tok, 64))
    dense = EMBED.evaluate(model, split)
    assert dense.cosine == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= dense.accuracy <= 1.0 and dense.n == len(split)
    with torch.no_grad():  # damage one layer: cosine must drop below 1
        model.encoder.layer[0].output.dense.weight.mul_(-3.0)
    assert EMBED.evaluate(model, split).cosine < 0.99
    batch = next(split.batches(4))
    with torch.no_grad():
        assert "targets" in batch and float(EMBED.importance_loss(model, batch)) > 0


# ----------------------------------------------------------------------------- config
def test_embedding_config_rejects_classifier_options() -> None:
    raw = tiny_job("x", task="embedding")
    raw["models"] = [{"ref": "x", "finetune_steps": 5}]
    raw["stages"][1]["loss"] = "kd"
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    text = str(err.value)
    assert "stages.1 (recover1): loss kd" in text and "models.0.finetune_steps" in text
    tiny_batches = tiny_job(
        "x", task="embedding", calibration={"batch_size": 1}, cluster={"workers": 3}
    )
    tiny_batches["stages"][3] |= {"runner": "ray_train", "batch_size": 4}  # 2 per worker: fine
    tiny_batches["stages"][5] |= {"runner": "ray_train", "batch_size": 3}  # 1 per worker
    with pytest.raises(ConfigError) as err:
        parse_config(tiny_batches)
    text = str(err.value)
    assert "calibration.batch_size" in text and "stages.5.batch_size" in text
    assert "stages.3.batch_size" not in text


def test_a_pruned_export_must_suit_the_task(tmp_path) -> None:
    path = save_tiny_encoder(tmp_path / "enc")
    encoder, tok = load_model(str(path), head="encoder")
    save_checkpoint(encoder, tok, tmp_path / "export")
    with pytest.raises(ModelError, match="holds a BertModel, which does not fit a classification"):
        load_model(str(tmp_path / "export"), num_labels=10)
    assert isinstance(load_model(str(tmp_path / "export"), head="encoder")[0], BertModel)


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
def test_embedding_job_on_ray_matches_local_scores(tmp_path, shared_ray) -> None:
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


def test_memory_model_sizes_an_encoder_output_by_its_hidden_width() -> None:
    from stages.memory_model import model_shape

    assert model_shape(tiny_bert(BertModel)).logits_width == 32  # not the 100-token vocabulary
    assert model_shape(tiny_bert()).logits_width == 3  # a classifier: its labels
