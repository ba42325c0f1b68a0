"""End of a model's cascade: export ONE checkpoint, reload it, evaluate what was exported, report."""

from __future__ import annotations

import time

from runner.models import count_params
from runner.pipeline import JobError
from runner.report import write_report
from stages.checkpoint import load_pruned, save_checkpoint
from stages.training import evaluate


def finish_model_run(run, start: float) -> dict:
    cfg = run.cfg
    ckpt_dir = run.out / "checkpoint"
    t0 = time.perf_counter()
    meta = {"job": cfg.name, "source_model": run.model_cfg.ref, "dense_params": run.dense_params}
    try:
        if (
            cfg.cluster.executor == "ray"
        ):  # workers write layer-range shards, merged into one checkpoint
            from cluster.shards import export_sharded

            export_sharded(
                run.model,
                run.tokenizer,
                ckpt_dir,
                run.executor.workers,
                run.executor,
                require_uniform=cfg.target.uniform_layout,
                metadata=meta,
            )
        else:
            save_checkpoint(
                run.model,
                run.tokenizer,
                ckpt_dir,
                require_uniform=cfg.target.uniform_layout,
                metadata=meta,
            )
    except OSError as exc:
        run.events.emit(
            "error", version=run.version, stage="export", error=f"{type(exc).__name__}: {exc}"
        )
        raise JobError(
            f"export to {ckpt_dir} failed ({exc.strerror or exc}); any previous checkpoint there is "
            "intact and the stage models are kept: fix the cause and rerun with --resume"
        ) from None
    run.events.emit(
        "export", version=run.version, path=str(ckpt_dir), seconds=time.perf_counter() - t0
    )
    # Evaluate the exported files, not the in-memory model: the report claims what the checkpoint does.
    exported = load_pruned(ckpt_dir)
    final_eval = {s: evaluate(exported, run.splits[s]) for s in ("test", "heldout")}
    params = count_params(exported)
    perplexity = run.perplexity.measure(exported) if run.perplexity else None
    validation = None
    if cfg.target.device is not None:
        from stages.validate import validate_for_job

        validation = validate_for_job(exported, run.dense_params, cfg, run.model_cfg)
        run.events.emit("validate", version=run.version, **validation)
    report = build_report(run, final_eval, params, validation, time.perf_counter() - start)
    if perplexity is not None:
        report["final"]["perplexity"] = perplexity | {"dense": run.dense_perplexity["perplexity"]}
    write_report(run.out, report, plots=cfg.output.plots)
    if cfg.output.plots:
        from runner.report_html import write_job_html

        write_job_html(run.out)
    if validation is not None:  # the report is written first, then a model that does not fit fails
        from stages.validate import ValidationFailed, check_fits

        try:
            check_fits(validation)
        except ValidationFailed as exc:
            run.events.emit("error", version=run.version, stage="validate", error=str(exc))
            raise
    run.events.emit(
        "job_end",
        version=run.version,
        compression_ratio=report["final"]["compression_ratio"],
        accuracy=report["final"]["accuracy"],
    )
    return report


def build_report(run, final_eval, params: int, validation, total_seconds: float) -> dict:
    dense_test = run.dense_eval["test"]
    test, heldout = final_eval["test"], final_eval["heldout"]
    embedding = {}
    if test.cosine is not None:  # embedding task: agreement with the dense model's embeddings
        embedding = {
            "cosine": test.cosine,
            "heldout_cosine": heldout.cosine,
            "dense_cosine": dense_test.cosine,
            "metric_note": "accuracy = leave-one-out 1-NN fault classification with the embeddings",
        }
    return {
        "model": run.model_info,
        "sia": run.sia,
        "warnings": run.warnings,
        "stages": run.records,
        "final": {
            "params": params,
            "dense_params": run.dense_params,
            "compression_ratio": run.dense_params / params,
            "accuracy": test.accuracy,
            "macro_f1": test.macro_f1,
            "heldout_accuracy": heldout.accuracy,
            "dense_accuracy": dense_test.accuracy,
            "dense_macro_f1": dense_test.macro_f1,
            "dense_heldout_accuracy": run.dense_eval["heldout"].accuracy,
            "confusion": test.confusion,
            "dense_finetune": run.finetune,
            **embedding,
            "checkpoint": str(run.out / "checkpoint"),
        },
        "validation": validation,
        "timing": {
            "total_seconds": round(total_seconds, 2),
            "per_stage": {r["name"]: r["seconds"] for r in run.records},
        },
        "job": {
            "name": run.cfg.name,
            "seed": run.cfg.seed,
            "executor": run.cfg.cluster.executor,
            "workers": run.executor.workers,
        },
    }
