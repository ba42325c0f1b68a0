"""Report pages: job (stage table, layer picture, SIA, device fit, confusion), compare, family.

HTML pages are self-contained; report.md and report.html of a job say the same thing."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from tiny_models import tiny_gpt2

from runner.data.bearing import CLASS_NAMES
from runner.demo_models import DEMO_MODELS, demo_config
from runner.report.blocks import render_markdown
from runner.report.job import job_page, write_job_html, write_report
from runner.report.layout import layer_breakdown
from runner.report.model import Report
from runner.report.pages import write_compare_report, write_family_report
from runner.tasks import chance_level_warning
from stages.arch import get_adapter
from stages.base import param_count
from stages.checkpoint import save_checkpoint

STAGES = ["layers", "recover1", "heads", "recover2", "channels", "recover3"]


def fake_report(name: str = "m", *, validation: bool = False, params: int = 500) -> dict:
    """A report.json with every key the pages read (numbers made up, shapes as written by finish.py)."""
    stages = [
        {
            "index": i,
            "name": s,
            "kind": s.rstrip("0123456789"),
            "version": i + 1,
            "params_before": 1000 - 50 * i,
            "params_after": 950 - 50 * i,
            "accuracy": 0.9 - 0.01 * i,
            "seconds": 1.5,
            "criterion": None if s.startswith("recover") else "taylor",
        }
        for i, s in enumerate(STAGES)
    ]
    confusion = [
        [3 if i == j else 0 for j in range(len(CLASS_NAMES))] for i in range(len(CLASS_NAMES))
    ]
    final = {
        "params": params,
        "dense_params": 1000,
        "compression_ratio": 1000 / params,
        "accuracy": 0.8,
        "macro_f1": 0.75,
        "heldout_accuracy": 0.7,
        "dense_accuracy": 0.9,
        "dense_heldout_accuracy": 0.85,
        "confusion": confusion,
    }
    valid = {
        "device": "jetson_orin_nano_8gb",
        "budget_bytes": 2**30,
        "peak_bytes": 2**29,
        "fits": True,
        "dense_peak_bytes": 2**31,
        "latency_ms": {"dense": 3.0, "pruned": 1.0},
    }
    return {
        "model": {
            "name": name,
            "architecture": "GPT2ForSequenceClassification",
            "attention": "mha",
            "mlp": "gelu",
            "params": 1000,
        },
        "sia": {
            "score": 0.9,
            "threshold": 0.5,
            "satisfied": False,
            "per_granularity": {"heads": 0.9},
            "policy": "warn",
        },
        "stages": stages,
        "final": final,
        "validation": valid if validation else None,
        "timing": {"total_seconds": 12.0, "per_stage": {s: 1.5 for s in STAGES}},
    }


def assert_self_contained(page: str) -> None:
    assert '<img alt="' in page and 'src="data:image/png;base64,' in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "external asset"
    assert "<script" not in page and "<link" not in page


def _pruned_gpt2(tmp_path):
    """A tiny GPT-2 with layer 1 removed, a head and FFN channels cut; its dense twin saved too."""
    dense = tiny_gpt2()
    dense_dir = tmp_path / "dense"
    dense.save_pretrained(dense_dir)
    model = tiny_gpt2()
    adapter = get_adapter(model)
    adapter.remove_layers(model, [1])
    adapter.prune_attention(model, 0, [0, 2, 3])
    adapter.prune_mlp(model, 1, list(range(20)))
    save_checkpoint(
        model, None, tmp_path / "job" / "checkpoint", metadata={"source_model": str(dense_dir)}
    )
    return model, dense


def test_layer_breakdown_counts_are_exact_for_pruned_and_dense(tmp_path):
    model, dense = _pruned_gpt2(tmp_path)
    bd = layer_breakdown(tmp_path / "job")

    def total(c):
        return c["embeddings"] + c["other"] + sum(sum(x.values()) for x in c["layers"])

    assert total(bd["pruned"]) == param_count(model)
    assert total(bd["dense"]) == param_count(dense)
    assert [x["num_heads"] for x in bd["pruned"]["layouts"]] == [3, 4]
    assert [x["intermediate_size"] for x in bd["pruned"]["layouts"]] == [48, 20]
    assert len(bd["dense"]["layers"]) == 3
    # layer 0 lost a quarter of its heads: attention shrank, MLP did not
    assert bd["pruned"]["layers"][0]["attention"] < bd["dense"]["layers"][0]["attention"]
    assert bd["pruned"]["layers"][0]["mlp"] == bd["dense"]["layers"][0]["mlp"]


def test_layer_breakdown_dense_shape_of_a_builtin_demo_model(tmp_path):
    spec = DEMO_MODELS["demo-tiny-llama"]
    from transformers import AutoModelForSequenceClassification

    dense = AutoModelForSequenceClassification.from_config(
        demo_config(spec, 40, len(CLASS_NAMES), 0)
    )
    model = AutoModelForSequenceClassification.from_config(
        demo_config(spec, 40, len(CLASS_NAMES), 0)
    )
    get_adapter(model).prune_attention(model, 1, [0])  # one of two KV groups
    save_checkpoint(model, None, tmp_path / "checkpoint", metadata={"source_model": spec.name})
    bd = layer_breakdown(tmp_path)
    dense_total = bd["dense"]["embeddings"] + bd["dense"]["other"]
    dense_total += sum(sum(x.values()) for x in bd["dense"]["layers"])
    assert dense_total == param_count(dense)
    assert [x["num_kv_heads"] for x in bd["pruned"]["layouts"]] == [2, 1]


def test_job_html_is_self_contained_and_mentions_every_stage(tmp_path):
    _pruned_gpt2(tmp_path)
    job = tmp_path / "job"
    (job / "report.json").write_text(json.dumps(fake_report("tiny-gpt2", validation=True)))
    page = write_job_html(job).read_text()
    assert_self_contained(page)
    for stage in STAGES:
        assert f"<td>{stage}</td>" in page
    assert page.count('src="data:image/png;base64,') == 3  # stages, layer picture, confusion
    assert "VIOLATED" in page and "jetson_orin_nano_8gb" in page and "fits" in page
    assert "Parameters per layer" in page and "embeddings" in page


def test_job_html_without_checkpoint_or_validation_still_renders(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(fake_report()))
    page = write_job_html(tmp_path).read_text()
    assert_self_contained(page)
    assert "Parameters per layer" not in page and "Device fit" not in page
    assert page.count('src="data:image/png;base64,') == 2  # stages + confusion matrix


def test_compare_html_marks_failures_and_embeds_the_plot(tmp_path):
    rows = [
        {
            "model": "m",
            "method": "cascade",
            "ratio": 2.0,
            "dir": str(tmp_path / "x"),
            "accuracy": 0.8,
            "macro_f1": 0.7,
            "achieved_ratio": 2.0,
        },
        {
            "model": "m",
            "method": "flap",
            "ratio": 2.0,
            "dir": str(tmp_path / "y"),
            "error": "JobError: boom",
        },
    ]
    result = {
        "name": "cmp",
        "methods": ["cascade", "flap"],
        "ratios": [2.0],
        "recovery_steps": 10,
        "rows": rows,
    }
    (tmp_path / "compare.json").write_text(json.dumps(result))
    page = write_compare_report(tmp_path).read_text()
    assert_self_contained(page)
    assert "0.8000 / 0.700 (2.0x)" in page and "JobError: boom" in page and ">failed<" in page
    md = (tmp_path / "compare.md").read_text()
    assert "| cascade | 0.8000 / 0.700 (2.0x) |" in md and "| flap | failed: JobError |" in md
    assert "![accuracy vs compression](compare.png)" in md
    assert (tmp_path / "compare.png").read_bytes() == _embedded_pngs(page)[0]


@pytest.mark.parametrize("with_device", [False, True])
def test_family_report_lists_failures_and_embeds_plots(tmp_path, with_device):
    ok = {
        "model": "a",
        "ref": "a",
        "dir": str(tmp_path / "a"),
        "status": "done",
        "architecture": "GPT2X",
        "attention": "mha",
        "mlp": "gelu",
        "dense_params": 1000,
        "params": 500,
        "compression_ratio": 2.0,
        "accuracy": 0.8,
        "dense_accuracy": 0.9,
        "sia_score": 0.2,
        "sia_threshold": 0.5,
        "sia_satisfied": True,
        "device": "jetson_orin_nano_8gb" if with_device else None,
        "budget_bytes": 2**30 if with_device else None,
        "peak_bytes": 2**29 if with_device else None,
        "fits": True if with_device else None,
        "seconds": 3,
    }
    bad = {
        "model": "gone",
        "ref": "/no/such/gone",
        "dir": str(tmp_path / "gone"),
        "status": "failed",
        "error": "ModelError: model '/no/such/gone': path does not exist",
    }
    summary = {
        "name": "fam",
        "description": "d",
        "method": "cascade",
        "target": {"ratio": 2.0},
        "execution": {"mode": "sequential", "cpus_per_job": 1, "gpus_per_job": 0},
        "seconds": 5,
        "counts": {"done": 1, "skipped": 0, "failed": 1},
        "models": [ok, bad],
    }
    (tmp_path / "family.json").write_text(json.dumps(summary))
    write_family_report(tmp_path)
    page = (tmp_path / "family.html").read_text()
    assert_self_contained(page)
    assert "path does not exist" in page and "/no/such/gone" in page
    expected = {"size.png", "sia.png"} | ({"device.png"} if with_device else set())
    assert {p.name for p in (tmp_path / "plots").iterdir()} == expected
    assert page.count('src="data:image/png;base64,') == len(expected)
    md = (tmp_path / "family.md").read_text()
    assert "failed: ModelError" in md and "0.8000 (0.9000)" in md
    assert write_family_report(tmp_path).read_text() == page  # the plots are drawn identically


def test_chance_level_warning_fires_only_near_guessing():
    assert chance_level_warning(0.10, 10, "classification") is not None
    assert chance_level_warning(0.149, 10, "classification") is not None
    assert chance_level_warning(0.151, 10, "classification") is None
    assert chance_level_warning(0.5, 1, "classification") is None  # one class: nothing to guess
    assert "0.1000 for 10 classes" in chance_level_warning(0.1, 10, "1-NN")


def test_warnings_and_dense_finetune_reach_markdown_and_html(tmp_path):
    report = fake_report()
    report["warnings"] = [chance_level_warning(0.1, 10, "classification")]
    report["final"]["dense_finetune"] = {
        "steps": 300,
        "lr": 5e-4,
        "first_loss": 2.3,
        "last_loss": 2.29,
    }
    text = _markdown(report)
    assert "**WARNING:** the dense model's classification test accuracy 0.1000 is at chance" in text
    assert "300 steps at lr 0.0005, training loss 2.300 -> 2.290" in text
    (tmp_path / "report.json").write_text(json.dumps(report))
    page = write_job_html(tmp_path).read_text()
    assert '<p class="bad"><b>WARNING:</b> the dense model&#x27;s classification' in page
    assert "300 steps at lr 0.0005, training loss 2.300 -&gt; 2.290." in page
    report["final"]["dense_finetune"]["cached"] = True
    assert "2.290 (weights loaded from the fine-tune cache)." in _markdown(report)
    quiet = _markdown(fake_report())
    assert "WARNING" not in quiet and "fine-tuned first" not in quiet


def _markdown(report: dict) -> str:
    return render_markdown(job_page(Report.model_validate(report), None, figures=False))


def _embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


# ----------------------------------------------------------------------------- md and html agree
class _HtmlItems(HTMLParser):
    """The page as (kind, content) items: headings, paragraphs, table rows, pictures (bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.items: list[tuple] = []
        self.text: list[str] | None = None
        self.row: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag in ("h1", "h2", "p", "td", "th"):
            self.text = []
        elif tag == "tr":
            self.row = []
        elif tag == "img":
            src = dict(attrs)["src"].removeprefix("data:image/png;base64,")
            self.items.append(("img", dict(attrs)["alt"], base64.b64decode(src)))
            self.text = None

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "p") and self.text is not None:
            self.items.append(("h" if tag[0] == "h" else "p", "".join(self.text)))
        elif tag in ("td", "th"):
            self.row.append("".join(self.text))
        elif tag == "tr":
            self.items.append(("row", self.row))
        if tag in ("h1", "h2", "p", "td", "th"):
            self.text = None

    def handle_data(self, data):
        if self.text is not None:
            self.text.append(data)


def _md_items(path: Path) -> list[tuple]:
    """The same items read from report.md: ** and link syntax removed, pictures from their files."""

    def plain(text: str) -> str:
        return re.sub(r"\[(.*?)\]\([^)]*\)", r"\1", text.replace("**", ""))

    items = []
    for line in path.read_text().splitlines():
        if not line or re.fullmatch(r"(\|---)+\|", line):
            continue
        if line.startswith("#"):
            items.append(("h", line.lstrip("#").strip()))
        elif line.startswith("!["):
            alt, file = re.fullmatch(r"!\[(.*)\]\((.*)\)", line).groups()
            items.append(("img", alt, (path.parent / file).read_bytes()))
        elif line.startswith("| "):
            cells = re.split(r"(?<!\\) \| ", line[2:-2])
            items.append(("row", [plain(c.replace("\\|", "|")) for c in cells]))
        else:
            items.append(("p", plain(line)))
    return items


def _embedding_report() -> dict:
    report = fake_report("tiny-bert")
    report["model"] |= {"architecture": "BertModel", "attention": "mha", "mlp": "gelu"}
    report["final"] |= {"cosine": 0.91234, "heldout_cosine": 0.9, "dense_cosine": 1.0}
    report["final"]["metric_note"] = "accuracy = leave-one-out 1-NN fault classification"
    for i, stage in enumerate(report["stages"]):
        stage["cosine"] = 0.99 - 0.01 * i
    report["sia"] = {}
    return report


def _classification_report() -> dict:
    report = fake_report("tiny-gpt2", validation=True)
    report["warnings"] = [chance_level_warning(0.1, 10, "classification")]
    report["final"]["dense_finetune"] = {"steps": 3, "lr": 1e-3, "first_loss": 2, "last_loss": 1}
    report["final"]["perplexity"] = {
        "file": "a|b.txt",  # a pipe: escaped in Markdown, plain in HTML
        "tokens": 12345,
        "window": 64,
        "perplexity": 17.5,
        "dense": 12.25,
    }
    return report


@pytest.mark.parametrize(
    "variant, expected",
    [
        (_classification_report, ["WARNING:", "fine-tuned first", "Perplexity on a|b.txt", "fits"]),
        (_embedding_report, ["cosine similarity to the dense embeddings 0.9123", "not run"]),
    ],
)
def test_job_markdown_and_html_have_the_same_sections_and_figures(tmp_path, variant, expected):
    _pruned_gpt2(tmp_path)
    job = tmp_path / "job"
    report = Report.model_validate(variant())
    write_report(job, report)
    write_job_html(job, report)
    md, html = _md_items(job / "report.md"), _HtmlItems()
    html.feed((job / "report.html").read_text())
    assert md == html.items
    headings = [x[1] for x in md if x[0] == "h"]
    assert headings[1:] == [
        "Structural Independence Assumption",
        "Stages",
        "Parameters per layer",
        *(["Confusion matrix"]),
        *(["Device fit"] if report.validation else []),
    ]
    assert [x[1] for x in md if x[0] == "img"] == [
        "accuracy per stage",
        "pruned layout",
        "confusion matrix",
    ]
    text = "\n".join(str(x[1]) for x in md)
    assert all(e in text for e in expected), [e for e in expected if e not in text]
    assert sorted(p.name for p in (job / "plots").iterdir()) == [
        "confusion.png",
        "layout.png",
        "stages.png",
    ]
    assert json.loads((job / "report.json").read_text()) == report.to_json()
