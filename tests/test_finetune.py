"""The dense fine-tune is cached per setting: a hit gives the very weights a fresh run trains."""

from __future__ import annotations

import pytest
import torch
from safetensors import SafetensorError
from tiny_models import tiny_gpt2

from runner.config import ModelConfig
from runner.finetune import finetune_dense
from stages.split import EncodedSplit


def _split(n: int = 32) -> EncodedSplit:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 60, (n, 6), generator=gen)
    return EncodedSplit(ids, torch.ones_like(ids), torch.arange(n) % 2)


def _run(cfg: ModelConfig, seed: int = 0):
    model, said = tiny_gpt2(num_labels=2), []
    record = finetune_dense(model, _split(), cfg, seed, False, said.append)
    return model, record, said


def test_second_identical_fine_tune_is_a_cache_hit_with_identical_weights():
    cfg = ModelConfig(ref="demo-tiny-gpt2", finetune_steps=5, finetune_lr=1e-3)
    fresh, first, said = _run(cfg)
    assert first["cached"] is False and "fine-tuned the dense model for 5 steps" in said[0]
    untrained = tiny_gpt2(num_labels=2)
    assert any(  # the fine-tune really changed the model, so equality below means something
        not torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), untrained.state_dict().values())
    )
    hit, second, said = _run(cfg)
    assert second["cached"] is True and "reused" in said[0]
    assert {k: v for k, v in second.items() if k != "cached"} == {
        k: v for k, v in first.items() if k != "cached"
    }
    for (name, a), b in zip(fresh.state_dict().items(), hit.state_dict().values()):
        assert torch.equal(a, b), name
    assert not hit.training


def test_other_settings_or_seed_miss_the_cache():
    base = ModelConfig(ref="demo-tiny-gpt2", finetune_steps=4, finetune_lr=1e-3)
    assert _run(base)[1]["cached"] is False
    assert _run(base.model_copy(update={"finetune_lr": 2e-3}))[1]["cached"] is False
    assert _run(base.model_copy(update={"max_length": 64}))[1]["cached"] is False
    assert _run(base, seed=1)[1]["cached"] is False
    assert _run(base)[1]["cached"] is True


def test_no_fine_tune_steps_means_no_record():
    assert _run(ModelConfig(ref="demo-tiny-gpt2"))[1] is None


@pytest.mark.parametrize("error", [OSError, SafetensorError])  # safetensors' own ENOSPC error
def test_a_failed_cache_write_leaves_no_entry_and_keeps_the_trained_model(
    error, monkeypatch, tmp_path
):
    import runner.finetune as finetune

    monkeypatch.setenv("CASCADE_CACHE", str(tmp_path))

    def disk_full(model, path):
        raise error("No space left on device")

    real_save = finetune.save_safetensors
    monkeypatch.setattr(finetune, "save_safetensors", disk_full)
    cfg = ModelConfig(ref="demo-tiny-gpt2", finetune_steps=2, finetune_lr=1e-3)
    model, record, said = _run(cfg)
    assert record["cached"] is False and "could not cache" in said[-1] and "No space" in said[-1]
    assert list((tmp_path / "finetuned").iterdir()) == []  # no entry, no temp dir
    monkeypatch.setattr(finetune, "save_safetensors", real_save)
    assert _run(cfg)[1]["cached"] is False  # the next run trains again and writes it
    (entry,) = (tmp_path / "finetuned").iterdir()
    assert (entry / "finetune.json").is_file() and (entry / "model.safetensors").is_file()
    assert _run(cfg)[1]["cached"] is True
