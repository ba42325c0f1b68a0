"""Why KD recovery lost to CE, and which distillation settings recover most per token.

    python benchmarks/distillation.py teacher-mass        # SmolLM2 against its own cached teacher
    python benchmarks/distillation.py small [--seeds 2]   # sweep on a small LM trained here
    python benchmarks/distillation.py smollm2 NAME [--set K=V ...]  # one SmolLM2 job, per domain

`teacher-mass`: SmolLM2-135M on 128 tokens of the README: the softened mass its top k tokens hold
at T = 1 / 2, and the KD loss and gradient norm of the model against its own top-k teacher with
the old renormalised KL and with the tail bucket (stages/objectives/lm_teacher.py).

`small`: a 4-layer Llama (hidden 128, vocabulary 2,048 from a BPE tokenizer trained on the two
built-in corpora) trained here on their train documents, 60% of its FFN channels cut by weight
norm, then recovered by LoRA at equal tokens with CE and with KD at top-k 32 / 128 / the whole
vocabulary, T = 1 / 2, alpha 1 / 0.5, plus the old renormalised KL; perplexity per domain on
validation documents (which choose) and test documents (which report).

`smollm2`: `cascade run configs/smollm2.yaml --set ...` for one named variant, then the exported
model's perplexity per domain on the validation documents (the report has the test documents).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runner.config import load_config  # noqa: E402
from runner.data.bearing import DataConfig  # noqa: E402
from runner.data.corpora import builtin_documents  # noqa: E402
from runner.data.text_sources import build_text_splits  # noqa: E402
from runner.job import run_job  # noqa: E402
from runner.setup_run import setup_model  # noqa: E402
from runner.tasks import get_task  # noqa: E402
from runner.tasks.causal_lm import encoded, per_domain  # noqa: E402
from stages.arch import get_adapter  # noqa: E402
from stages.checkpoint import load_pruned  # noqa: E402
from stages.objectives import TeacherSpec, get_objective  # noqa: E402
from stages.objectives.causal_lm import next_token_targets  # noqa: E402
from stages.objectives.lm_teacher import topk_kl  # noqa: E402
from stages.recover import RecoverySettings, recover  # noqa: E402
from stages.split import EncodedSplit  # noqa: E402
from stages.training import TrainSettings, flush_denormals, train_steps, training_loss  # noqa: E402

LM = get_objective("causal_lm")
EVAL_BLOCKS = 64  # validation / test blocks per domain (their first ones: documents are shuffled)
SOURCES = [
    {"path": "builtin:stdlib_docs", "domain": "docs", "weight": 0.7},
    {"path": "builtin:bearing_notes", "domain": "bearing", "weight": 0.3},
]


def machine() -> dict:
    model = next(
        (x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
         if x.startswith("model name")), "unknown",
    )  # fmt: skip
    return {"cpu": model, "threads": torch.get_num_threads(), "load": os.getloadavg()}


# ---------------------------------------------------------------- the old loss, for comparison
def renormalised_kl(student_logits, rows, valid, temperature: float):
    """What causal_lm used before the tail bucket: the teacher renormalised over its top k."""
    values = rows.values[:, :-1].float() / temperature
    picked = F.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1).gather(
        -1, rows.indices[:, :-1].long()
    )
    target = F.log_softmax(values, dim=-1)
    kl = (target.exp() * (target - picked)).sum(-1)
    return (kl * valid).sum() / valid.sum().clamp_min(1) * temperature**2


class RenormalisedKD:
    """The causal-LM objective with the old renormalised top-k KL as its kd loss."""

    name = "causal_lm_renormalised"

    def __getattr__(self, item):
        return getattr(LM, item)

    def kd_loss(self, outputs, teacher, batch, *, temperature, alpha):
        _, valid = next_token_targets(batch)
        kl = renormalised_kl(outputs, teacher, valid, temperature)
        return kl if alpha >= 1 else alpha * kl + (1 - alpha) * LM.loss(outputs, batch)


# ---------------------------------------------------------------------------- teacher-mass
def cmd_teacher_mass(args) -> dict:
    cfg = load_config(ROOT / "configs" / "smollm2.yaml")
    model, tokenizer = setup_model(cfg, cfg.models[0], get_task("causal_lm"))
    text = (ROOT / "README.md").read_text()
    ids = torch.tensor([tokenizer(text)["input_ids"][:128]])
    split = EncodedSplit(ids, torch.ones_like(ids), torch.zeros(1, dtype=torch.long))
    batch = next(split.batches(1))
    out = {"machine": machine(), "tokens": ids.shape[1], "rows": []}
    with flush_denormals():
        with torch.no_grad():
            logits = LM.outputs(model, batch).float()
        for temperature in (1.0, 2.0):
            for k in (32, 128):
                p = torch.softmax(logits[0, :-1] / temperature, -1)
                mass = float(p.topk(k, -1).values.sum(-1).mean())
                teacher = LM.make_teacher(model, split, TeacherSpec(k, (temperature,)))
                row = {"T": temperature, "k": k, "top_k_mass": round(mass, 4)}
                for name, loss_fn in (("renormalised", renormalised_kl), ("tail_bucket", topk_kl)):
                    model.zero_grad(set_to_none=True)
                    _, valid = next_token_targets(batch)
                    loss = loss_fn(LM.outputs(model, batch), teacher(batch), valid, temperature)
                    loss.backward()
                    grad = torch.stack(
                        [p.grad.norm() for p in model.parameters() if p.grad is not None]
                    )
                    row[name] = {"loss": float(loss.detach()), "grad_norm": float(grad.norm())}
                print(row, flush=True)
                out["rows"].append(row)
    return out


# ------------------------------------------------------------------------------------ small
def small_tokenizer(vocab: int):
    # lazy: tokenizers is only needed to build the small sweep's vocabulary
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [d.text for name in ("stdlib_docs", "bearing_notes") for d in builtin_documents(name)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="</s>",
    )  # fmt: skip


def small_data(tokenizer, block: int):
    text = build_text_splits(
        SOURCES, tokenizer, block, seed=0, validation_fraction=0.05, test_fraction=0.2,
        calibration_blocks=16,
        data_cfg_for_bearing=DataConfig(samples_per_class_per_load=20, text_style="sentences"),
    )  # fmt: skip
    splits = {name: encoded(getattr(text, name)) for name in ("train", "validation", "test")}
    splits |= {
        s: encoded(per_domain(getattr(text, s), EVAL_BLOCKS)) for s in ("validation", "test")
    }
    return splits, list(text.domains)


def by_domain(model, split: EncodedSplit, domains: list[str]) -> dict[str, float]:
    out = {}
    for i, domain in enumerate(domains):
        rows = torch.nonzero(split.labels == i).flatten()
        out[domain] = round(LM.evaluate(model, split.subset(rows)).perplexity, 3)
    return out


def small_dense(tokenizer, splits, args):
    # lazy: only the small sweep builds a Llama from a config
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.block,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    settings = TrainSettings(steps=args.dense_steps, lr=3e-3, batch_size=16, seed=0)
    train_steps(model, splits["train"], settings, training_loss(LM, settings, None))
    return model.eval()


def cut_ffn(dense, keep_fraction: float):
    """Keep the FFN channels with the largest weight norms (gate row, up row, down column)."""
    model = copy.deepcopy(dense)
    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.layers(model)):
        mlp = layer.mlp
        norms = (
            mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1)
            * mlp.down_proj.weight.norm(dim=0)
        )  # fmt: skip
        keep = norms.topk(int(keep_fraction * norms.numel())).indices.sort().values
        adapter.prune_mlp(model, i, keep.tolist())
    return model, adapter


def small_variants() -> list[dict]:
    variants = [{"name": "ce", "loss": "ce"}]
    variants += [
        {"name": f"renorm_k32_T2_a{a:g}", "loss": "kd", "k": 32, "T": 2.0, "alpha": a, "old": True}
        for a in (1.0, 0.5)
    ]
    for k in (32, 128, None):
        for temperature in (1.0, 2.0):
            for alpha in (1.0, 0.5):
                name = f"kd_k{k or 'full'}_T{temperature:g}_a{alpha:g}"
                variants.append(
                    {"name": name, "loss": "kd", "k": k, "T": temperature, "alpha": alpha}
                )
    return variants


def cmd_small(args) -> dict:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tokenizer = small_tokenizer(args.vocab)
    splits, domains = small_data(tokenizer, args.block)
    rows_needed = args.steps * args.batch
    order = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(0))
    recovery = splits["train"].subset(order[:rows_needed].sort().values)
    out = {"machine": machine(), "args": vars(args) | {"func": None}, "domains": domains}
    out["blocks"] = {s: len(v) for s, v in splits.items()} | {"recovery": len(recovery)}
    print(out, flush=True)
    with flush_denormals():
        dense = small_dense(tokenizer, splits, args)
        out["dense"] = {s: by_domain(dense, splits[s], domains) for s in ("validation", "test")}
        pruned, adapter = cut_ffn(dense, args.keep)
        out["pruned"] = {s: by_domain(pruned, splits[s], domains) for s in ("validation", "test")}
        print("dense", out["dense"], "pruned", out["pruned"], flush=True)
        teachers = {
            k: LM.make_teacher(dense, recovery, TeacherSpec(top_k=k, temperatures=(1.0, 2.0)))
            for k in (32, 128, None)
        }
        out["runs"] = []
        for variant in small_variants():
            for seed in range(args.seeds):
                model = copy.deepcopy(pruned)
                settings = RecoverySettings(
                    method="lora", steps=args.steps, lr=args.lr, batch_size=args.batch,
                    loss=variant["loss"], kd_temperature=variant.get("T", 2.0),
                    kd_alpha=variant.get("alpha", 0.5), seed=seed,
                )  # fmt: skip
                objective = RenormalisedKD() if variant.get("old") else LM
                teacher = teachers[variant["k"]] if variant["loss"] == "kd" else None
                t0 = time.perf_counter()
                model, metrics = recover(model, adapter, recovery, settings, objective, teacher)
                row = {
                    "variant": variant["name"], "seed": seed,
                    "seconds": round(time.perf_counter() - t0, 1),
                    **{s: by_domain(model, splits[s], domains) for s in ("validation", "test")},
                }  # fmt: skip
                print(row, flush=True)
                out["runs"].append(row)
    out["summary"] = summarise(out["runs"], domains)
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def summarise(runs: list[dict], domains: list[str]) -> list[dict]:
    """Mean over seeds of each variant's per-domain perplexity (geometric mean across domains
    as the one number to rank validation by)."""
    table = []
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == name]
        row = {"variant": name}
        for split in ("validation", "test"):
            per = {d: statistics.mean(r[split][d] for r in mine) for d in domains}
            row[split] = {d: round(v, 2) for d, v in per.items()}
            row[f"{split}_geomean"] = round(
                math.exp(statistics.mean(math.log(v) for v in per.values())), 2
            )
        table.append(row)
    return sorted(table, key=lambda r: r["validation_geomean"])


# ------------------------------------------------------------------------------------ smollm2
def cmd_smollm2(args) -> dict:
    cfg = load_config(args.config, args.set)
    cfg.output.progress = False
    out = Path(args.output) / args.name
    t0 = time.perf_counter()
    if args.reuse and (out / "report.json").is_file():  # measured earlier: evaluate only
        report = json.loads((out / "report.json").read_text())
    else:
        with flush_denormals():
            (report,) = run_job(cfg, out, force=True, log=print).values()
    wall = report["timing"]["total_seconds"] if args.reuse else time.perf_counter() - t0
    task = get_task("causal_lm")
    model = load_pruned(out / "checkpoint")
    dense, tokenizer = setup_model(cfg, cfg.models[0], task)
    data = task.build_data(cfg, cfg.models[0], dense, tokenizer)
    domains = list(data.extras["text_stats"])
    validation = data.splits["validation"]
    with flush_denormals():
        result = {
            "name": args.name, "set": args.set, "machine": machine(), "seconds": round(wall, 1),
            "validation": by_domain(model, validation, domains),
            "dense_validation": by_domain(dense, validation, domains),
            "test": {d: v["pruned"] for d, v in report["final"]["perplexity_by_domain"].items()},
            "dense_test": {d: v["dense"] for d, v in report["final"]["perplexity_by_domain"].items()},
            "generations": [g["pruned"] for g in report["final"]["generations"]],
            "recover_seconds": [s["seconds"] for s in report["stages"] if s["kind"] == "recover"],
        }  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("teacher-mass")
    p.set_defaults(func=cmd_teacher_mass)
    p = sub.add_parser("small")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--dense-steps", type=int, default=600)
    p.add_argument("--keep", type=float, default=0.4, help="FFN channels kept")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_small)
    p = sub.add_parser("smollm2")
    p.add_argument("name")
    p.add_argument("--config", default=str(ROOT / "configs" / "smollm2.yaml"))
    p.add_argument("--set", action="append", default=[])
    p.add_argument("-o", "--output", default="/tmp/distillation")
    p.add_argument("--reuse", action="store_true", help="a finished job in the output: measure it")
    p.set_defaults(func=cmd_smollm2)
    p.add_argument_group()
    parser.add_argument("--json", help="also write the result here")
    run_and_report(parser)


def run_and_report(parser: argparse.ArgumentParser) -> None:
    """Run the chosen subcommand; print its result as JSON and write it to --json if given."""
    args = parser.parse_args()
    text = json.dumps(args.func(args), indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
