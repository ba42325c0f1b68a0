"""Layer-streamed pruning equals the in-memory path: scores, plans, checkpoint, logits.

The in-memory reference runs `estimate_locally` on the whole model (padding masks included), the
same budget and plan functions, and `apply_plan` between stages; the streamed path must give
bit-for-bit the same statistics and scores, identical PrunePlans, and a checkpoint that
`load_pruned` turns into a model with the in-memory pruned model's weights and logits.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import padded_batch, tiny_bert, tiny_llama, tiny_mistral, tiny_qwen2
from transformers import LlamaForCausalLM

from cluster.compensate_model import prune_in_memory
from cluster.executor import LocalExecutor
from cluster.layer_passes import Heartbeat
from cluster.stream_prune import StreamingError, stream_prune, stream_scores
from stages.arch import get_adapter
from stages.base import apply_plan
from stages.checkpoint import load_pruned, save_checkpoint, verify_manifest
from stages.estimate import EstimateRequest, estimate_locally
from stages.prune_stage import PruneStage
from stages.stage_plan import PlanLimits
from stages.streaming.lazy_weights import LazyCheckpoint, LazyWeightsError, ShardWriter

BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral}
UNIT_REQUESTS = [
    EstimateRequest(g, c)
    for g in ("heads", "channels")
    for c in ("wanda", "activation", "fluctuation", "condition", "l2")
]
REQUESTS = [EstimateRequest("layers", "block_influence"), *UNIT_REQUESTS]


def calibration(n: int = 3, side: str = "right") -> list[dict]:
    """Padded micro-batches (rows of different lengths), as the job's calibration batches."""
    out = []
    for seed in range(n):
        ids, mask = padded_batch(batch=3, seq_len=9, side=side, seed=seed)
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def saved(model, tmp_path, name="source", shard="3KB"):
    """The model as a sharded safetensors checkpoint (several files + index)."""
    path = tmp_path / name
    model.save_pretrained(path, max_shard_size=shard)
    return path


def assert_scores_equal(got, want) -> None:
    if isinstance(want, torch.Tensor):
        assert torch.equal(got, want)
        return
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_streamed_scores_and_sums_equal_in_memory(family, tmp_path):
    model = BUILDERS[family]()
    adapter = get_adapter(model)
    source = saved(model, tmp_path)
    batches = calibration(side="left" if family == "qwen2" else "right")
    for request in REQUESTS:
        want, want_stats = estimate_locally(model, adapter, batches, request)
        got, got_stats = stream_scores(
            source, batches, request, attn_implementation="eager", keep_sums=True
        )
        assert_scores_equal(got, want)
        for key, value in want_stats.items():
            assert torch.equal(got_stats[key], value), (request, key)


@pytest.mark.parametrize("family", ["qwen3", "phi3", "gpt2", "gpt_neox", "opt"])
def test_other_decoder_families_score_like_in_memory(family, tmp_path):
    """Fused qkv (phi3), Conv1D (gpt2), parallel residual (neox), learned positions (gpt2, opt)."""
    import tiny_models

    model = getattr(tiny_models, f"tiny_{family.replace('gpt_', '')}")(attn_implementation="sdpa")
    adapter = get_adapter(model)
    source = saved(model, tmp_path)
    batches = calibration(n=2)
    requests = [REQUESTS[0], EstimateRequest("heads", "fluctuation"), UNIT_REQUESTS[-1]]
    if family != "opt":  # the in-memory hook cannot index OPT's flattened FFN input by the mask
        requests.append(EstimateRequest("channels", "wanda"))
    for request in requests:
        want, _ = estimate_locally(model, adapter, batches, request)
        got, _ = stream_scores(source, batches, request, attn_implementation="sdpa")
        assert_scores_equal(got, want)


def test_rows_split_over_two_workers_give_the_same_sums(tmp_path):
    """Four micro-batches over two in-process workers: per-batch sums reduced in batch order."""
    model = tiny_llama(attn_implementation="sdpa")
    adapter = get_adapter(model)
    source = saved(model, tmp_path)
    batches = calibration(n=4)
    for request in (EstimateRequest("layers", "block_influence"), *UNIT_REQUESTS[:3]):
        want, want_stats = estimate_locally(model, adapter, batches, request)
        got, got_stats = stream_scores(
            source, batches, request, executor=LocalExecutor(None, layer_workers=2),
            attn_implementation="sdpa", keep_sums=True,
        )  # fmt: skip
        assert_scores_equal(got, want)
        for key in ("rows", "tokens", "0.x_sum", "2.x_sq_sum", "1.dist_sum"):
            if key in want_stats:
                assert torch.equal(got_stats[key], want_stats[key]), key


# ---- the cascade -------------------------------------------------------------------------------
def cascade_stages(bias: bool) -> list[PruneStage]:
    """With `bias`: compensated cuts, sequential lsq for heads and FLAP's bias for channels."""
    return [
        PruneStage(kind="layers", criterion="block_influence", share=0.3),
        PruneStage(
            kind="heads", criterion="wanda", share=0.3, compensate="lsq" if bias else "none"
        ),
        PruneStage(
            kind="channels",
            criterion="fluctuation",
            share=0.4,
            compensate="bias" if bias else "none",
        ),
    ]


@pytest.mark.parametrize(
    "family,bias", [("llama", True), ("qwen2", False), ("mistral", False)], ids=str
)
def test_streamed_cascade_matches_in_memory(family, bias, tmp_path):
    model = BUILDERS[family]()
    source = saved(model, tmp_path)
    batches = calibration()
    stages = cascade_stages(bias)
    target = sum(p.numel() for p in model.parameters()) // 2
    lines: list[str] = []
    plans = stream_prune(
        source,
        tmp_path / "out",
        stages,
        batches,
        limits=PlanLimits(params_target=target),
        attn_implementation="eager",
        max_shard_size="4KB",
        log=lines.append,
    )
    reference = BUILDERS[family]()
    want = prune_in_memory(
        reference, get_adapter(reference), stages, batches, PlanLimits(params_target=target)
    )
    assert [asdict(p) for p in plans] == [asdict(p) for p in want]
    assert plans[0].drop_layers and all(p.removed_units() for p in plans)
    if bias:
        assert plans[2].refit is not None and plans[2].compensation["layers"]
    assert any("stage channels" in line for line in lines)

    out = tmp_path / "out"
    verify_manifest(out)
    assert (out / "model.safetensors.index.json").is_file()
    loaded = load_pruned(out, attn_implementation="eager")
    ids, mask = padded_batch(batch=3, seq_len=9, seed=7)
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
        expected = reference(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, expected)
    # the same directory save_checkpoint writes for the in-memory model
    save_checkpoint(reference, None, tmp_path / "memory")
    want_state = load_file(tmp_path / "memory" / "model.safetensors")
    got_state = {}
    for shard in sorted(out.glob("model-*.safetensors")):
        got_state.update(load_file(shard))
    assert sorted(got_state) == sorted(want_state)
    assert all(torch.equal(got_state[k], want_state[k]) for k in want_state)
    pruning = json.loads((out / "config.json").read_text())["pruning"]
    memory = json.loads((tmp_path / "memory" / "config.json").read_text())["pruning"]
    assert pruning == memory


def test_tied_causal_lm_bf16_source_streams_in_float32(tmp_path):
    """bf16 weights on disk, float32 compute, tied LM head: the written tensors are exact slices."""
    torch.manual_seed(0)
    config = tiny_llama().config
    config.tie_word_embeddings = True
    config.architectures = None
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    source = saved(model, tmp_path, shard="100MB")
    stages = [
        PruneStage(kind="heads", criterion="l2", count=1),
        PruneStage(kind="channels", criterion="wanda", count=20),
    ]
    plans = stream_prune(
        source,
        tmp_path / "out",
        stages,
        calibration(),
        compute_dtype=torch.float32,
        log=lambda _: None,
    )
    reference = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    reference.load_state_dict(model.state_dict())
    for plan in plans:
        apply_plan(reference, get_adapter(reference), plan)
    loaded = load_pruned(tmp_path / "out")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    state = load_file(tmp_path / "out" / "model.safetensors")
    assert "lm_head.weight" not in state
    for name, value in reference.state_dict().items():
        if name != "lm_head.weight":
            assert state[name].dtype == torch.bfloat16 and torch.equal(state[name], value), name


# ---- refusals and building blocks ----------------------------------------------------------------
def test_taylor_and_loss_delta_are_refused_with_alternatives(tmp_path):
    llama = saved(tiny_llama(), tmp_path, "llama")
    taylor = [PruneStage(kind="heads", criterion="taylor", count=1)]
    with pytest.raises(StreamingError, match=r"whole model.*wanda, l2, activation, fluctuation"):
        stream_prune(llama, tmp_path / "o", taylor, calibration(), log=lambda _: None)
    loss_delta = [PruneStage(kind="layers", criterion="loss_delta", count=1)]
    with pytest.raises(StreamingError, match="use block_influence"):
        stream_prune(llama, tmp_path / "o", loss_delta, calibration(), log=lambda _: None)
    assert not (tmp_path / "o").exists()


def test_bad_requests_are_refused_before_any_pass(tmp_path):
    llama = saved(tiny_llama(), tmp_path, "llama")
    stages = [PruneStage(kind="heads", criterion="wanda", share=1.0)]
    with pytest.raises(StreamingError, match="share needs params_target"):
        stream_prune(llama, tmp_path / "o", stages, calibration(), log=lambda _: None)
    with pytest.raises(StreamingError, match="calibration_batches is empty"):
        stream_prune(llama, tmp_path / "o", stages, [], limits=PlanLimits(1), log=lambda _: None)
    qwen = saved(tiny_qwen2(), tmp_path, "qwen")
    flap = [PruneStage(kind="channels", criterion="fluctuation", count=1, compensate="bias")]
    with pytest.raises(StreamingError, match="cannot express one"):
        stream_prune(qwen, tmp_path / "o", flap, calibration(), log=lambda _: None)
    bert = saved(tiny_bert(), tmp_path, "bert")
    with pytest.raises(StreamingError, match="not supported by the layer-streamed path"):
        stream_prune(bert, tmp_path / "o", stages, calibration(), limits=PlanLimits(1))
    pickled = tmp_path / "pickled"  # config.json but no safetensors (e.g. only .bin files)
    pickled.mkdir()
    (pickled / "config.json").write_text((llama / "config.json").read_text())
    with pytest.raises(LazyWeightsError, match="reads safetensors only"):
        LazyCheckpoint(pickled)
    assert not (tmp_path / "o").exists()


def test_lazy_reads_close_their_memory_map(tmp_path):
    source = saved(tiny_llama(), tmp_path, shard="100MB")
    checkpoint = LazyCheckpoint(source)
    weight = checkpoint.read("model.layers.1.mlp.down_proj.weight", torch.float64)
    rows = checkpoint.read_rows("model.embed_tokens.weight", torch.tensor([3, 4, 5, 9]))
    with open(f"/proc/{os.getpid()}/maps") as maps:
        assert str(source) not in maps.read()  # the copies own their memory
    full = load_file(source / "model.safetensors")
    assert torch.equal(weight, full["model.layers.1.mlp.down_proj.weight"].double())
    assert torch.equal(rows, full["model.embed_tokens.weight"][[3, 4, 5, 9]])


def test_shard_writer_plans_headers_and_refuses_out_of_plan_writes(tmp_path):
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.ones(5, dtype=torch.bfloat16),
        "c": torch.arange(40, dtype=torch.int64).reshape(10, 4),
    }
    entries = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    writer = ShardWriter(tmp_path, entries, max_shard_size=40)
    writer.write("a", tensors["a"])
    writer.write("b", tensors["b"])
    writer.write_chunks("c", [tensors["c"][:3], tensors["c"][3:]])
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 24 + 10 + 320
    loaded = {}
    for shard in sorted(set(index["weight_map"].values())):
        loaded.update(load_file(tmp_path / shard))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    bad = ShardWriter(tmp_path / "x", entries, max_shard_size="1GB")
    (tmp_path / "x").mkdir()
    with pytest.raises(LazyWeightsError, match="expected tensor a, got b"):
        bad.write("b", tensors["b"])
    with pytest.raises(LazyWeightsError, match="planned torch.float32"):
        bad.write("a", tensors["a"].double())


def test_heartbeat_logs_while_a_long_step_runs():
    lines: list[str] = []
    with Heartbeat(lines.append, every=0.05) as beat:
        beat.status = "streamed heads pass (wanda): layer 3/28"
        time.sleep(0.3)
    assert any(line.startswith("streamed heads pass (wanda): layer 3/28 (") for line in lines)


# ---- Ray workers -------------------------------------------------------------------------------
def _cpus_in_use(ray, used: list[float]):
    """A log that records the Ray CPUs in use at each stage line (its layer passes still open)."""

    def log(line: str) -> None:
        if line.startswith("stage "):
            free = ray.available_resources().get("CPU", 0.0)
            used.append(ray.cluster_resources()["CPU"] - free)

    return log


@pytest.mark.slow
@pytest.mark.ray
def test_ray_workers_split_rows_and_make_the_same_plans(tmp_path, shared_ray):
    """1 and 2 Ray actors (5 micro-batches: uneven shards) = the in-process streamed path. The
    RayExecutor serving the layer passes holds only its layer workers' CPUs: its importance
    actors start with the first importance call, which a streamed run never makes."""
    from cluster.ray_executor import RayExecutor
    from runner.config import ClusterConfig

    model = tiny_llama()
    source = saved(model, tmp_path)
    batches = calibration(n=5)
    stages = cascade_stages(bias=True)
    target = sum(p.numel() for p in model.parameters()) // 2
    common = dict(limits=PlanLimits(target), attn_implementation="eager")
    local = stream_prune(source, tmp_path / "local", stages, batches, log=lambda _: None, **common)
    for workers in (1, 2):
        used: list[float] = []
        cpus_in_use = _cpus_in_use(shared_ray, used)
        out = tmp_path / f"ray{workers}"
        cfg = ClusterConfig(executor="ray", workers=workers, cpus_per_worker=0.5)
        with RayExecutor(cfg, None) as executor:
            plans = stream_prune(
                source, out, stages, batches, executor=executor, log=cpus_in_use, **common
            )
        assert [asdict(p) for p in plans] == [asdict(p) for p in local]
        manifest = json.loads((out / "manifest.json").read_text())["files"]
        want = json.loads((tmp_path / "local" / "manifest.json").read_text())["files"]
        assert manifest == want
        assert used == [0.5 * workers] * len(stages)
