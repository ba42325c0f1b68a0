"""`cascade sia`: the SIA verdict for each model of a job, before any GPU hours are spent."""

from __future__ import annotations

from runner.models import describe_model
from runner.setup_run import setup_model
from runner.tasks import get_task
from stages.arch import get_adapter
from stages.sia import run_sia


def sia_for_config(cfg, log=print) -> dict[str, dict]:
    """Load each model as the job would (task head, data, dense fine-tune), then measure SIA:
    the verdict is about the model the job prunes, not a random head."""
    task = get_task(cfg.task)
    results = {}
    for model_cfg in cfg.models:
        model, tokenizer = setup_model(cfg, model_cfg, task)
        data = task.build_data(cfg, model_cfg, model, tokenizer)
        task.prepare_dense(cfg, model_cfg, model, data, log)
        batches = list(data.splits["calibration"].batches(cfg.calibration.batch_size))
        result = run_sia(model, get_adapter(model), batches, cfg.sia, task.objective, seed=cfg.seed)
        info = describe_model(model)
        results[model_cfg.output_name] = {"model": info, "ref": model_cfg.ref} | result
        verdict = "satisfied" if result["satisfied"] else "VIOLATED"
        parts = ", ".join(f"{g} {v:.3f}" for g, v in result["per_granularity"].items())
        log(
            f"{model_cfg.output_name} ({info['attention']}+{info['mlp']}): SIA {verdict}, score {result['score']:.3f} "
            f"(threshold {result['threshold']}; {parts})"
        )
    return results
