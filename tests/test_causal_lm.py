"""task: causal_lm: the next-token objective and its top-k teacher, config checks, and the job
end to end on a tiny Llama and local text (local, resumed and on Ray workers)."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from runner.cli.eval import main as eval_main
from runner.compare import CompareConfig, run_compare
from runner.config import ConfigError, parse_config
from runner.demo_models import build_tokenizer
from runner.job import run_job
from runner.report.figures import perplexity_stages_plot
from runner.report.layout import layer_breakdown
from runner.report.model import Report
from runner.tasks import get_task
from stages.checkpoint import load_pruned
from stages.objectives import TeacherSpec, get_objective
from stages.objectives.lm_teacher import CachedTopK
from stages.split import EncodedSplit

LM = get_objective("causal_lm")
WORDS = "the bearing inner race outer ball fault shaft speed vibration note load peak order".split()


# ----------------------------------------------------------------------------- objective maths
def test_next_token_loss_counts_real_token_pairs_only() -> None:
    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 1] = math.log(3.0)  # p(next = 1) = 3/5 at position 0
    batch = {
        "input_ids": torch.tensor([[0, 1, 2, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0]]),
    }
    # pairs (0 -> 1) and (1 -> 2) are real; (2 -> pad) is not
    expected = (-math.log(3 / 5) - math.log(1 / 3)) / 2
    assert float(LM.loss(logits, batch)) == pytest.approx(expected, rel=1e-6)


def test_importance_loss_of_two_halves_adds_up_to_the_whole() -> None:
    model = tiny_lm(vocab=40)
    ids = torch.randint(4, 40, (4, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    whole = {"input_ids": ids, "attention_mask": mask}
    halves = [{k: v[i : i + 2] for k, v in whole.items()} for i in (0, 2)]
    with torch.no_grad():
        total = float(LM.importance_loss(model, whole))
        parts = sum(float(LM.importance_loss(model, h)) for h in halves)
    assert total == pytest.approx(parts, rel=1e-5)


def test_topk_teacher_stores_k_logits_and_a_tail_per_temperature() -> None:
    model = tiny_lm(vocab=40)
    ids = torch.randint(4, 40, (3, 8), generator=torch.Generator().manual_seed(1))
    split = EncodedSplit(ids, torch.ones_like(ids), torch.zeros(3, dtype=torch.long))
    teacher = LM.make_teacher(model, split, TeacherSpec(top_k=5, temperatures=(1.0, 2.0)))
    assert isinstance(teacher, CachedTopK) and len(teacher) == 3
    # fp32 value + int32 index per entry, one fp32 tail per temperature, int64 id + bool mask
    assert teacher.nbytes == 3 * 8 * (5 * (4 + 4) + 2 * 4 + 8 + 1)
    batch = next(split.batches(3))
    with torch.no_grad():
        outputs = LM.outputs(model, batch)
        same = LM.kd_loss(outputs, teacher(batch), batch, temperature=2.0, alpha=1.0)
        other = LM.kd_loss(-outputs, teacher(batch), batch, temperature=2.0, alpha=1.0)
    assert abs(float(same)) < 1e-5 and float(other) > 1e-2


def test_evaluate_reports_perplexity_and_next_token_accuracy() -> None:
    model = tiny_lm(vocab=40)
    ids = torch.randint(4, 40, (5, 10), generator=torch.Generator().manual_seed(2))
    split = EncodedSplit(ids, torch.ones_like(ids), torch.zeros(5, dtype=torch.long))
    result = LM.evaluate(model, split)
    batch = next(split.batches(5))
    with torch.no_grad():
        loss = float(LM.loss(LM.outputs(model, batch), batch))
    assert result.loss == pytest.approx(loss, rel=1e-5) and result.tokens == 5 * 9
    assert result.perplexity == pytest.approx(math.exp(loss), rel=1e-5)
    assert 0.0 <= result.accuracy <= 1.0


# ----------------------------------------------------------------------------- config
def test_causal_lm_config_lists_its_problems(tmp_path) -> None:
    raw = lm_job(tmp_path / "lm", {"sources": []})
    raw["models"] = [{"ref": "x", "finetune_steps": 3}]
    raw["evaluation"]["perplexity_file"] = __file__
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    text = str(err.value)
    assert "data.sources: a causal_lm job needs text" in text
    assert "models.0.finetune_steps" in text and "evaluation.perplexity_file" in text


def test_text_options_are_refused_for_other_tasks() -> None:
    from conftest import tiny_job

    raw = tiny_job()
    raw["stages"][1]["loss"] = "lm"
    raw["data"]["sources"] = ["builtin:stdlib_docs"]
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert "stages.1.loss: lm is next-token" in str(err.value)
    assert (
        "data.sources: an option of task causal_lm, not of this job's task classification"
        in str(err.value)
    )


# ----------------------------------------------------------------------------- end to end
def tiny_lm(vocab: int = 64, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def lm_workspace(root: Path) -> Path:
    """A tiny Llama causal LM with a word tokenizer, and 30 documents of simple sentences."""
    rng = random.Random(0)
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    texts = []
    for d in range(30):
        sentences = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 9))).capitalize() + "."
            for _ in range(6)
        ]
        text = " ".join(sentences)
        (corpus / f"doc{d:02d}.txt").write_text(text)
        texts.append(text)
    tok = build_tokenizer(texts + [t.lower() for t in texts])
    model = tiny_lm(vocab=len(tok))
    model.config.update({"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                         "eos_token_id": tok.eos_token_id})  # fmt: skip
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root


def lm_job(root: Path, data: dict | None = None) -> dict:
    return {
        "name": "lm",
        "task": "causal_lm",
        "models": [{"ref": str(root / "model"), "max_length": 24}],
        "data": {
            "seed": 0,
            "calibration_size": 8,
            "sources": [{"path": str(root / "corpus"), "split_by": "file", "domain": "words"}],
        }
        | (data or {}),
        "calibration": {"batch_size": 4},
        "target": {"ratio": 1.4},
        "stages": [
            {"kind": "layers", "criterion": "block_influence", "count": 1},
            {"kind": "recover", "steps": 3, "batch_size": 4, "loss": "lm"},
            {"kind": "heads", "criterion": "taylor", "share": 0.5},
            {"kind": "recover", "steps": 3, "batch_size": 4, "loss": "kd", "teacher": "dense"},
            {"kind": "channels", "criterion": "wanda", "share": 0.5},
            {"kind": "recover", "steps": 3, "batch_size": 4, "loss": "kd", "teacher": "pre_stage"},
        ],
        "sia": {"enabled": True, "pairs": 2, "batches": 1, "rows": 2, "max_tokens": 16},
        "evaluation": {
            "choice_tasks": [{"kind": "cloze", "limit": 6, "context_sentences": 2}],
            "stage_choice_items": 3,
            "max_new_tokens": 4,
        },
        "output": {"plots": True, "progress": False},
    }


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = lm_workspace(tmp_path_factory.mktemp("lm"))
    raw = lm_job(root)
    (report,) = run_job(parse_config(raw), root / "out", log=lambda m: None).values()
    return root, raw, report


@pytest.mark.slow
def test_causal_lm_job_compresses_and_reports_lm_figures(lm_run) -> None:
    root, _, report = lm_run
    final = report["final"]
    assert final["params"] < final["dense_params"] and final["compression_ratio"] > 1.3
    assert final["lm_perplexity"] > 1 and final["dense_lm_perplexity"] > 1
    assert set(final["perplexity_by_domain"]) == {"words"}
    assert final["choice_accuracy"]["cloze"]["n"] == 6
    assert [g["prompt"] for g in final["generations"]][0] == "What is the capital of France?"
    assert all(r["perplexity"] > 1 for r in report["stages"])
    exported = load_pruned(root / "out" / "checkpoint")
    assert type(exported).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        out = exported.generate(torch.tensor([[2, 5, 6]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
    md, html = ((root / "out" / f"report.{ext}").read_text() for ext in ("md", "html"))
    for page in (md, html):
        assert "Language modelling" in page and "Zero-shot multiple choice" in page
        assert f"{final['lm_perplexity']:.2f}" in page and "What is the capital of France?" in page
    lines = (root / "out" / "events.jsonl").read_text().splitlines()
    events = [json.loads(x)["event"] for x in lines]
    assert events[0] == "job_start" and events[-1] == "job_end" and "sia" in events


@pytest.mark.slow
def test_causal_lm_job_resumes_to_the_same_checkpoint(lm_run, tmp_path) -> None:
    root, raw, _ = lm_run
    out = tmp_path / "resumed"
    shutil.copytree(root / "out", out)
    for stage in ("04_channels", "05_recover3"):
        shutil.rmtree(out / "stages" / stage)
    shutil.rmtree(out / "checkpoint")
    (out / "report.json").unlink()
    run_job(parse_config(raw), out, resume=True, log=lambda m: None)
    a = load_pruned(root / "out" / "checkpoint").state_dict()
    b = load_pruned(out / "checkpoint").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.ray
def test_causal_lm_importance_on_ray_workers_gives_the_same_plans(
    lm_run, tmp_path, shared_ray
) -> None:
    root, raw, _ = lm_run
    ray_job = yaml.safe_load(yaml.safe_dump(raw)) | {"cluster": {"executor": "ray", "workers": 2}}
    # Plans depend on the stages only: no SIA, choice tasks or plots on the Ray side (time).
    ray_job |= {"sia": {"enabled": False}, "output": {"plots": False, "progress": False}}
    ray_job["evaluation"] |= {"choice_tasks": [], "stage_choice_items": 0}
    run_job(parse_config(ray_job), tmp_path / "ray", log=lambda m: None)
    for stage in ("00_layers", "02_heads", "04_channels"):
        a = json.loads((root / "out" / "stages" / stage / "plan.json").read_text())
        b = json.loads((tmp_path / "ray" / "stages" / stage / "plan.json").read_text())
        assert a["keep"] == b["keep"] and a["drop_layers"] == b["drop_layers"], stage
        torch.testing.assert_close(flat(a["scores"]), flat(b["scores"]), rtol=1e-6, atol=1e-9)


def flat(scores) -> torch.Tensor:
    """A plan's scores (per layer, or per layer per unit) as one float64 vector."""
    values = [v for s in scores for v in (s if isinstance(s, list) else [s])]
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.slow
def test_compare_of_causal_lms_tabulates_perplexity_and_choice_accuracy(lm_run, tmp_path) -> None:
    root, raw, _ = lm_run
    job = {k: v for k, v in raw.items() if k not in ("stages", "target", "name")}
    job |= {"sia": {"enabled": False}, "output": {"plots": False, "progress": False}}
    cfg = CompareConfig(methods=["shortgpt", "l2_mlp_kd"], ratios=[1.3], recovery_steps=2, job=job)
    result = run_compare(cfg, tmp_path / "cmp", log=lambda m: None)
    rows = result["rows"]
    assert [r.get("error") for r in rows] == [None, None]
    for row in rows:
        report = json.loads((Path(row["dir"]) / "report.json").read_text())["final"]
        assert row["lm_perplexity"] == report["lm_perplexity"] > 1
        assert row["perplexity_by_domain"]["words"] == report["perplexity_by_domain"]["words"]
        assert row["choice_accuracy"]["cloze"]["n"] == 6
    assert rows[0]["dense_lm_perplexity"] == rows[1]["dense_lm_perplexity"]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert (
        "| method | target | achieved | params | test ppl | ppl words | cloze acc / acc_norm |"
        in md
    )
    for row in rows:
        assert f"{row['lm_perplexity']:.2f}" in md
    assert f"| dense |  | 1.0x |  | {rows[0]['dense_lm_perplexity']:.2f} |" in md
    assert "for a causal LM the accuracy is next-token top-1 accuracy" in md


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed")
def test_cascade_eval_reproduces_the_jobs_choice_accuracy_through_lm_eval(lm_run, capsys) -> None:
    root, _, report = lm_run
    code = eval_main([str(root / "out" / "checkpoint"), "--tasks", "cloze", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    expected = report["final"]["choice_accuracy"]["cloze"]
    assert json.loads(captured.out)["cloze"] == {
        "n": expected["n"], "acc": expected["acc"], "acc_norm": expected["acc_norm"]
    }  # fmt: skip


@pytest.mark.slow
def test_causal_lm_report_shows_perplexity_per_stage_and_the_dense_layer_column(lm_run) -> None:
    root, _, _ = lm_run
    out = root / "out"
    report = Report.read(out / "report.json")
    reference = report.final.validation_perplexity_by_domain["words"]
    assert reference.dense > 1 and reference.pruned > 1
    assert all(set(r.perplexity_by_domain) == {"words"} for r in report.stages)
    (ax,) = perplexity_stages_plot(report).axes
    assert ax.get_yscale() == "log" and ax.get_title() == "words"
    stages, dense = ax.get_lines()
    assert list(dense.get_ydata()) == [reference.dense] * 2
    assert list(stages.get_ydata())[-1] == reference.pruned
    html = (out / "report.html").read_text()
    for alt in ("perplexity per stage", "pruned layout"):
        assert f'<img alt="{alt}" src="data:image/png;base64,' in html
    md = (out / "report.md").read_text().split("## Parameters per layer")[1].split("\n\n")[1]
    rows = [line.split(" | ") for line in md.splitlines()[2:]]
    assert [r[0].strip("| ") for r in rows] == [
        "embeddings", "attention", "MLP", "layer norms", "head / final norm"
    ]  # fmt: skip
    assert all(r[1] not in ("-", "") for r in rows), rows  # the dense column, every part
    assert re.search(r"<td>attention</td><td>[0-9.]+k</td><td>[0-9.]+k</td>", html)
    counts = layer_breakdown(out)  # tied embeddings counted once: the table adds up to the job's
    total = lambda c: c["embeddings"] + c["other"] + sum(sum(x.values()) for x in c["layers"])  # noqa: E731
    assert (total(counts["dense"]), total(counts["pruned"])) == (
        report.final.dense_params, report.final.params
    )  # fmt: skip


def test_stage_choice_items_zero_scores_no_choice_task_after_a_stage(tmp_path) -> None:
    """stage_choice_items: 0 with choice tasks set: after-stage metrics leave the choice scores
    out instead of scoring an empty sample (NaN, written as null with a warning per stage)."""
    root = lm_workspace(tmp_path)
    task = get_task("causal_lm")
    model = LlamaForCausalLM.from_pretrained(root / "model")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    for items, expected in ((0, None), (2, {"cloze"})):
        raw = lm_job(root)
        raw["evaluation"]["stage_choice_items"] = items
        cfg = parse_config(raw)
        data = task.build_data(cfg, cfg.models[0], model, tokenizer)
        metrics = task.stage_metrics(model, data)
        assert (
            None if metrics.choice_acc_norm is None else set(metrics.choice_acc_norm)
        ) == expected
        assert all(math.isfinite(v) for v in (metrics.choice_acc_norm or {}).values())


def test_too_few_validation_documents_warn_naming_the_domain_and_the_fix(tmp_path) -> None:
    """Settings chosen on two documents' perplexity can be far from held-out text's: say so."""
    root = lm_workspace(tmp_path)
    task = get_task("causal_lm")
    model = LlamaForCausalLM.from_pretrained(root / "model")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    for fraction, documents in ((0.05, 2), (0.2, 6)):  # of the workspace's 30 documents
        cfg = parse_config(lm_job(root, {"validation_fraction": fraction}))
        dense = task.measure(model, task.build_data(cfg, cfg.models[0], model, tokenizer))
        assert dense.validation_documents == {"words": documents}
        warnings = task.dense_warnings(dense)
        assert len(warnings) == (documents < 3)
        assert all("'words'" in w and "data.validation_fraction" in w for w in warnings)
