"""Causal-LM distillation from a cached top-k teacher: exact against itself at every temperature
and k (the tail bucket), and the cached rows line up with what training reads (shuffled epochs,
padding, left-trimmed batches, Ray shards), or the lookup fails loudly."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_job
from test_causal_lm import lm_job
from transformers import LlamaConfig, LlamaForCausalLM

from cluster.train_loop import shard_indices
from runner.config import ConfigError, RecoverStageConfig, parse_config
from runner.recovery import teacher_spec
from stages.objectives import TeacherSpec, get_objective
from stages.objectives.lm_teacher import TeacherError, TopKRows, topk_kl
from stages.split import EncodedSplit
from stages.training import TrainSettings, run_steps, training_loss

LM = get_objective("causal_lm")
VOCAB = 64
TEMPERATURES = (0.5, 1.0, 2.0, 4.0)


def sharp_lm(seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama whose next-token distributions are far from uniform (large embeddings), so
    a top-k teacher drops real mass and a wrong loss shows."""
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)
    return model.eval()


def text_split(rows: int = 6, width: int = 10, *, left_pad: int = 0, seed: int = 3) -> EncodedSplit:
    """Random token rows; the last row is right-padded (a packed stream's partial last block),
    and `left_pad` leading columns of every row are padding (a left-padding tokenizer)."""
    ids = torch.randint(4, VOCAB, (rows, width), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[-1, width - 3 :] = 0
    mask[:, :left_pad] = 0
    return EncodedSplit(ids * mask, mask, torch.zeros(rows, dtype=torch.long))


class Frozen:
    """A stepper that leaves the weights alone (AdamW would move them by ~lr even on a ~1e-7
    gradient): every step's loss is then the loss of the teacher itself on that step's rows."""

    def __init__(self, model):
        self.model = model

    def step(self, loss) -> None:
        loss.backward()


def self_kd(model, teacher, batch, temperature: float) -> tuple[float, float]:
    """(KD loss of the model against its own cached teacher, gradient norm over all weights)."""
    model.zero_grad(set_to_none=True)
    loss = LM.kd_loss(
        LM.outputs(model, batch), teacher(batch), batch, temperature=temperature, alpha=1.0
    )
    loss.backward()
    grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    return float(loss.detach()), float(torch.stack(grads).norm())


@pytest.mark.parametrize("top_k", [4, 16, None])
def test_a_model_distilled_into_itself_has_zero_loss_and_gradient_at_every_temperature(top_k):
    model, split = sharp_lm(), text_split()
    teacher = LM.make_teacher(model, split, TeacherSpec(top_k=top_k, temperatures=TEMPERATURES))
    batch = next(split.batches(len(split)))
    for temperature in TEMPERATURES:
        loss, grad = self_kd(model, teacher, batch, temperature)
        assert abs(loss) < 1e-5 and grad < 1e-4, (top_k, temperature, loss, grad)
    model.zero_grad(set_to_none=True)
    scrambled = LM.outputs(model, batch).detach().roll(1, dims=-1)  # another distribution
    with torch.no_grad():
        other = LM.kd_loss(scrambled, teacher(batch), batch, temperature=2.0, alpha=1.0)
    assert float(other) > 0.1


def test_the_tail_bucket_is_what_keeps_the_truncated_teacher_exact():
    """The teacher's top k at T = 2 hold well under all of its mass; a student that moves the
    rest into those k tokens (what renormalising the teacher over its top k asks for) is
    penalised, the teacher itself is not."""
    model, split = sharp_lm(), text_split()
    teacher = LM.make_teacher(model, split, TeacherSpec(top_k=4, temperatures=(2.0,)))
    batch = next(split.batches(len(split)))
    rows = teacher(batch)
    with torch.no_grad():
        logits = LM.outputs(model, batch)
        kept = torch.full_like(logits, -1e4).scatter(-1, rows.indices.long(), rows.values)
        top_mass = torch.softmax(logits / 2.0, -1).gather(-1, rows.indices.long()).sum(-1)
        _, valid = (batch["input_ids"][:, 1:], batch["attention_mask"].bool())
        itself = topk_kl(logits, rows, valid[:, 1:] & valid[:, :-1], 2.0)
        renormalised = topk_kl(kept, rows, valid[:, 1:] & valid[:, :-1], 2.0)
    assert float(top_mass.mean()) < 0.9  # the tail carries real mass here
    assert abs(float(itself)) < 1e-5 and float(renormalised) > 0.05


def test_shuffled_padded_epochs_keep_the_self_distillation_loss_at_zero():
    """Every step of three shuffled epochs (batches of 4 over 6 rows, one right-padded) looks up
    the rows it trains on: a misaligned row or position would give a loss far above zero."""
    model, split = sharp_lm(), text_split()
    teacher = LM.make_teacher(model, split, TeacherSpec(top_k=8, temperatures=(2.0,)))
    settings = TrainSettings(steps=6, batch_size=4, loss="kd", kd_alpha=1.0)
    losses = run_steps(Frozen(model), split, settings, training_loss(LM, settings, teacher))
    assert len(losses) == 6 and max(abs(x) for x in losses) < 1e-5


@pytest.mark.parametrize("rank", [0, 1])
def test_a_ray_shard_reads_its_own_rows_of_the_full_split_teacher(rank):
    """cluster/train.py trains worker `rank` on split.subset(rows) with the rows' global indices;
    the teacher, cached for the full split, must answer with those rows."""
    model, split = sharp_lm(), text_split(rows=7)
    teacher = LM.make_teacher(model, split, TeacherSpec(top_k=8, temperatures=(1.0,)))
    rows = shard_indices(len(split), rank, 2)
    settings = TrainSettings(steps=4, batch_size=2, loss="kd", kd_alpha=1.0, kd_temperature=1.0)
    stepper = Frozen(model)
    loss_fn = training_loss(LM, settings, teacher)
    losses = run_steps(stepper, split.subset(rows), settings, loss_fn, rows=rows)
    assert max(abs(x) for x in losses) < 1e-5
    with pytest.raises(TeacherError, match="not computed on this batch"):  # local row numbers
        run_steps(stepper, split.subset(rows[rows != torch.arange(len(rows))]), settings, loss_fn)


def test_left_trimmed_batches_line_up_with_the_cached_positions():
    model, split = sharp_lm(), text_split(left_pad=2)
    teacher = LM.make_teacher(model, split, TeacherSpec(top_k=8, temperatures=(2.0,)))
    batch = next(split.batches(2))
    assert batch["input_ids"].shape[1] == 8  # two padding columns trimmed off the front
    loss, grad = self_kd(model, teacher, batch, 2.0)
    assert abs(loss) < 1e-5 and grad < 1e-4


def test_a_teacher_of_other_rows_or_temperatures_is_refused():
    model, split = sharp_lm(), text_split()
    teacher = LM.make_teacher(model, split, TeacherSpec(top_k=8, temperatures=(2.0,)))
    for other in (text_split(seed=4), text_split(rows=8)):  # other tokens; rows it has not
        with pytest.raises(TeacherError, match="not computed on this batch"):
            teacher(next(other.batches(8)))
    rows = teacher(next(split.batches(3)))
    assert isinstance(rows, TopKRows) and set(rows.tails) == {2.0}
    logits = torch.zeros(3, 10, VOCAB)
    with pytest.raises(TeacherError, match=r"temperatures \[2.0\], not 1.0"):
        topk_kl(logits, rows, torch.ones(3, 9, dtype=torch.bool), 1.0)


def test_teacher_spec_covers_every_stage_that_reads_the_teacher():
    def stage(**kw):
        return RecoverStageConfig.model_validate({"kind": "recover", "loss": "kd", **kw})

    stages = [
        stage(teacher="dense", kd_temperature=1.0, kd_top_k=32),
        stage(teacher="dense", kd_temperature=2.0, kd_top_k=128),
        stage(teacher="pre_stage", kd_temperature=3.0, kd_top_k=None),
        RecoverStageConfig(kind="recover", loss="ce", kd_temperature=5.0),
    ]
    assert teacher_spec(stages, "dense") == TeacherSpec(top_k=128, temperatures=(1.0, 2.0))
    assert teacher_spec(stages, "pre_stage") == TeacherSpec(top_k=None, temperatures=(3.0,))
    assert teacher_spec(stages) == TeacherSpec(top_k=None, temperatures=(1.0, 2.0, 3.0))


def test_recover_stages_take_their_tasks_defaults_and_explicit_settings_win(tmp_path):
    lm = lm_job(tmp_path)
    lm["stages"][1] = {"kind": "recover", "steps": 3, "batch_size": 4}
    lm["stages"][3]["kd_temperature"] = 3.0
    recovers = [s for s in parse_config(lm).stages if s.kind == "recover"]
    assert [(s.loss, s.teacher, s.kd_temperature) for s in recovers] == [
        ("kd", "dense", 1.0),  # a causal LM distils the dense model by default
        ("kd", "dense", 3.0),
        ("kd", "pre_stage", 1.0),  # lm_job names this one's teacher
    ]
    bearing = [s for s in parse_config(tiny_job()).stages if s.kind == "recover"]
    assert {(s.loss, s.teacher, s.kd_temperature) for s in bearing} == {("ce", "pre_stage", 2.0)}


def test_a_streamed_causal_lm_job_recovers_by_ce_and_refuses_kd(tmp_path):
    lm = lm_job(tmp_path)
    lm["calibration"]["streamed"] = True
    lm["stages"] = [
        {"kind": "layers", "criterion": "block_influence", "count": 1},
        {"kind": "channels", "criterion": "wanda", "share": 1.0},
        {"kind": "recover", "steps": 3, "batch_size": 4},
    ]
    assert parse_config(lm).stages[2].loss == "ce"  # no dense model held: nothing to distil
    lm["stages"][2]["loss"] = "kd"
    with pytest.raises(ConfigError, match="stages.2.loss: kd needs a teacher cached"):
        parse_config(lm)
