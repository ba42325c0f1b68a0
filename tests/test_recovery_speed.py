"""Faster recovery steps that keep the maths: the LM head and loss run in chunks over the valid
positions only (same loss and gradients as the plain path, CE and KD, LoRA-wrapped or not), and
bf16 autocast chosen by the CPU's flags and a measured matmul (stages/precision.py)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_distillation import sharp_lm, text_split
from transformers import GPT2Config, GPT2LMHeadModel

from stages import precision
from stages.objectives import TeacherSpec, get_objective
from stages.training import TrainingError, TrainSettings, train_steps, training_loss

LM = get_objective("causal_lm")


def tiny_gpt2_lm() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def loss_and_grads(model, settings: TrainSettings, teacher, batch):
    model.zero_grad(set_to_none=True)
    loss = training_loss(LM, settings, teacher)(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


@pytest.mark.parametrize("build", [sharp_lm, tiny_gpt2_lm])
@pytest.mark.parametrize("loss", ["ce", "kd"])
@pytest.mark.parametrize("lora", [False, True])
def test_chunked_head_and_loss_give_the_plain_loss_and_gradients(build, loss, lora):
    model, split = build(), text_split()  # the last row is right-padded
    teacher = LM.make_teacher(model, split, TeacherSpec(top_k=6, temperatures=(2.0,)))
    with torch.no_grad():  # move the student away from its teacher: a non-zero KD gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    if lora:
        targets = ["q_proj", "v_proj"] if build is sharp_lm else ["c_attn"]
        model = get_peft_model(
            model, LoraConfig(r=2, target_modules=targets, fan_in_fan_out=build is not sharp_lm)
        )
    batch = next(split.batches(len(split))) | {"index": torch.arange(len(split))}
    plain = TrainSettings(steps=1, loss=loss, kd_alpha=0.5, kd_temperature=2.0)
    value, grads = loss_and_grads(model, plain, teacher if loss == "kd" else None, batch)
    for chunk in (1, 7, 10_000):
        chunked = TrainSettings(steps=1, loss=loss, kd_alpha=0.5, kd_temperature=2.0)
        chunked.loss_chunk = chunk
        got, got_grads = loss_and_grads(model, chunked, teacher if loss == "kd" else None, batch)
        assert got == pytest.approx(value, rel=1e-5)
        assert got_grads.keys() == grads.keys() and grads
        for name, grad in grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_models_outside_the_plain_head_families_fall_back_to_the_plain_loss():
    model, split = sharp_lm(), text_split()
    batch = next(split.batches(len(split)))
    model.config.model_type = "gemma2"  # soft-caps its logits: head(backbone(x)) is not its output
    assert LM.chunked_loss(model, batch, None, chunk=4, temperature=1.0, alpha=0.0) is None
    settings = TrainSettings(steps=1, loss_chunk=4)
    with torch.no_grad():
        plain = float(LM.loss(LM.outputs(model, batch), batch))
    assert float(training_loss(LM, settings, None)(model, batch)) == pytest.approx(plain)


def test_bf16_is_chosen_only_with_native_flags_and_a_measured_gain(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n")
    assert {"avx512_bf16", "avx512f"} <= precision.cpu_flags(str(info))
    assert precision.cpu_flags(str(tmp_path / "missing")) == set()
    precision.bf16_decision.cache_clear()
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2"})
    use, why = precision.bf16_decision("cpu")
    assert not use and "neither avx512_bf16 nor amx_bf16" in why
    precision.bf16_decision.cache_clear()
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"amx_bf16"})
    speeds = {torch.float32: 100.0, torch.bfloat16: 110.0}
    monkeypatch.setattr(precision, "matmul_gflops", lambda dtype, *a, **k: speeds[dtype])
    use, why = precision.bf16_decision("cpu")
    assert not use and "110 GFLOP/s bf16 vs 100 fp32" in why  # a 10% gain does not pay
    precision.bf16_decision.cache_clear()
    speeds[torch.bfloat16] = 400.0
    assert precision.bf16_decision("cpu")[0]
    assert precision.autocast_dtype("auto", torch.device("cpu")) is torch.bfloat16
    precision.bf16_decision.cache_clear()
    assert precision.autocast_dtype("fp32", torch.device("cpu")) is None
    assert precision.autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16


def test_a_bf16_autocast_run_tracks_the_fp32_run():
    split = text_split()
    runs = {}
    for mode in ("fp32", "bf16"):
        model = sharp_lm()
        settings = TrainSettings(steps=4, batch_size=3, lr=1e-3, precision=mode)
        runs[mode] = train_steps(model, split, settings, training_loss(LM, settings, None))
        assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
    for a, b in zip(runs["fp32"], runs["bf16"]):
        assert b == pytest.approx(a, rel=0.05)
    assert runs["bf16"][-1] < runs["bf16"][0]


def test_bad_precision_or_chunk_settings_are_refused():
    with pytest.raises(TrainingError, match="unknown precision 'fp8'"):
        TrainSettings(steps=1, precision="fp8").validate()
    with pytest.raises(TrainingError, match="loss_chunk must be >= 0"):
        TrainSettings(steps=1, loss_chunk=-1).validate()
