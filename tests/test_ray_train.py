"""Distributed recovery: the worker loop equals in-process recover(); Ray Train DDP run resumes."""

from __future__ import annotations

import copy
import importlib.util
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama

from cluster.train import recover_distributed
from cluster.train_loop import DistributedRecoveryError, per_worker_batch_size, shard_indices
from stages.arch import get_adapter
from stages.objectives import CachedOutputs, get_objective
from stages.recover import RecoverySettings, prepare_trainable, recover
from stages.split import EncodedSplit
from stages.training import (
    TorchStepper,
    epoch_batches,
    plain_state,
    run_steps,
    steps_per_epoch,
    training_loss,
)

CLASSIFY = get_objective("classification")


def loss_fn(settings: RecoverySettings, teacher=None):
    return training_loss(CLASSIFY, settings.train_settings(), teacher)


def worker_stepper(model, settings: RecoverySettings) -> TorchStepper:
    """What a Ray Train worker builds: LoRA-wrapped model, its trainable params, a TorchStepper."""
    trained, params = prepare_trainable(model, get_adapter(model), settings)
    return TorchStepper(trained, params, settings.train_settings())


def make_split(rows: int = 24, seq: int = 8, seed: int = 0) -> EncodedSplit:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (rows, seq), generator=gen)
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[::3, 5:] = 0  # padded rows: batches trim columns, attention sees a mask
    labels = torch.randint(0, 3, (rows,), generator=gen)
    return EncodedSplit(ids.masked_fill(mask == 0, 0), mask, labels)


def cluster_cfg(workers: int) -> SimpleNamespace:
    return SimpleNamespace(workers=workers, cpus_per_worker=1.0, gpus_per_worker=0.0, address=None)


def test_shards_cover_every_row_like_distributed_sampler():
    shards = [shard_indices(10, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # padded to equal length
    assert sorted(torch.cat(shards).tolist()) == sorted(list(range(10)) + [0, 1])  # wraps around
    assert shard_indices(10, 1, 3).tolist() == [1, 4, 7, 0]
    assert per_worker_batch_size(16, 3) == 6 and steps_per_epoch(12, 8) == 2
    with pytest.raises(DistributedRecoveryError, match="rank=3"):
        shard_indices(10, 3, 3)


@pytest.mark.parametrize("build, loss", [(tiny_gpt2, "ce"), (tiny_llama, "kd")])
def test_single_worker_loop_reproduces_in_process_recover_exactly(build, loss):
    model, split = build(), make_split(20)
    settings = RecoverySettings(steps=7, batch_size=6, lr=5e-3, seed=3, loss=loss)
    teacher = CachedOutputs(torch.randn(len(split), 3, generator=torch.Generator().manual_seed(1)))
    reference = copy.deepcopy(model)
    adapter = get_adapter(reference)
    reference, metrics = recover(reference, adapter, split, settings, CLASSIFY, teacher)

    stepper = worker_stepper(model, settings)  # world = 1: the whole split is rank 0's shard
    rows = shard_indices(len(split), 0, 1)
    losses = run_steps(
        stepper, split.subset(rows), settings.train_settings(), loss_fn(settings, teacher),
        rows=rows, batch_size=per_worker_batch_size(settings.batch_size, 1),
    )  # fmt: skip
    assert losses == metrics["losses"]
    state, expected = plain_state(stepper.model, lora=True), reference.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_resuming_at_an_epoch_boundary_gives_the_uninterrupted_result(tmp_path):
    split, settings = make_split(20), RecoverySettings(steps=9, batch_size=8, lr=5e-3)
    rows = shard_indices(len(split), 0, 1)

    class WorkerDied(Exception):
        pass

    def fresh_stepper() -> TorchStepper:
        return worker_stepper(tiny_gpt2(), settings)

    def train(stepper, **kwargs):
        return run_steps(
            stepper, split.subset(rows), settings.train_settings(), loss_fn(settings),
            rows=rows, batch_size=8, **kwargs,
        )  # fmt: skip

    def run(stop_after_epoch: int | None):
        stepper, saved = fresh_stepper(), {}

        def on_epoch(step, losses):
            if step // 3 == stop_after_epoch:
                stepper.save(tmp_path, rank=0)
                saved.update(step=step, losses=list(losses))
                raise WorkerDied

        try:
            losses = train(stepper, on_epoch=on_epoch)
        except WorkerDied:
            stepper = fresh_stepper()
            stepper.load(tmp_path)
            losses = train(stepper, resume=(saved["step"], saved["losses"]))
        return losses, plain_state(stepper.model, lora=True)

    full_losses, full = run(None)
    resumed_losses, resumed = run(1)  # 3 steps per epoch: dies after step 3, resumes there
    assert resumed_losses == full_losses and len(full_losses) == 9
    assert all(torch.equal(resumed[k], full[k]) for k in full)


CLS = "classification"


def test_bad_requests_fail_before_starting_ray():
    model, split = tiny_gpt2(), make_split()
    adapter, cfg = get_adapter(model), cluster_cfg(2)
    with pytest.raises(DistributedRecoveryError, match="unknown strategy 'fsdp'"):
        recover_distributed(model, adapter, split, RecoverySettings(), CLS, None, cfg, "fsdp")
    with pytest.raises(DistributedRecoveryError, match="method 'mask'"):
        recover_distributed(model, adapter, split, RecoverySettings(method="mask"), CLS, None, cfg)
    with pytest.raises(DistributedRecoveryError, match="needs a teacher"):
        recover_distributed(model, adapter, split, RecoverySettings(loss="kd"), CLS, None, cfg)
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(DistributedRecoveryError, match=r"pip install \.\[deepspeed\]"):
            recover_distributed(
                model, adapter, split, RecoverySettings(), CLS, None, cfg, "deepspeed_zero2"
            )
    same, metrics = recover_distributed(
        model, adapter, split, RecoverySettings(steps=0), CLS, None, cfg
    )
    assert same is model and metrics["losses"] == [] and metrics["first_loss"] is None


def simulate_two_worker_ddp(model, split, settings):
    """What 2-rank DDP computes, in one process: mean of the ranks' losses (= averaged grads)."""
    stepper = worker_stepper(model, settings)
    trained, loss = stepper.model, loss_fn(settings)
    batch_size = per_worker_batch_size(settings.batch_size, 2)
    rows = [shard_indices(len(split), r, 2) for r in range(2)]
    losses, epoch = [], 0  # the tiny models have no dropout: no RNG to match
    while len(losses) < settings.steps:
        streams = [
            epoch_batches(split.subset(r), r, batch_size, settings.seed + epoch) for r in rows
        ]
        for pair in zip(*streams):
            mean = sum(loss(trained, b) for b in pair) / 2
            stepper.step(mean)
            losses.append(float(mean))
            if len(losses) == settings.steps:
                break
        epoch += 1
    return losses, plain_state(trained, lora=True)


@pytest.mark.slow
@pytest.mark.ray
def test_ray_train_ddp_resumes_after_a_killed_worker_and_matches_simulation(tmp_path, shared_ray):
    model, split = tiny_gpt2(), make_split(24)
    settings = RecoverySettings(
        steps=9, batch_size=8, lr=5e-3
    )  # 12 rows/worker, 4/batch: 3 steps/epoch
    expected_losses, expected = simulate_two_worker_ddp(copy.deepcopy(model), split, settings)
    fault = {"epoch": 1, "marker": str(tmp_path / "killed")}
    out, metrics = recover_distributed(
        model, get_adapter(model), split, settings, CLS, None, cluster_cfg(2), "ddp", fault=fault
    )
    assert (tmp_path / "killed").exists()  # a worker really died once
    assert metrics["resumed_from_step"] == 3  # and the group restarted from the epoch-1 checkpoint
    assert out is model and not any(n for n, _ in model.named_modules() if "lora" in n)
    assert len(metrics["losses"]) == 9 and metrics["trainable_params"] > 0
    torch.testing.assert_close(metrics["losses"], expected_losses, atol=1e-5, rtol=1e-5)
    state = model.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, atol=1e-5, rtol=1e-5, msg=name)
