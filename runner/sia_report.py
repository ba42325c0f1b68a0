"""`cascade sia`: the SIA verdict for each model of a job, before any GPU hours are spent."""

from __future__ import annotations

import torch

from runner.data import CLASS_NAMES, build_dataset
from runner.models import describe_model, load_model
from stages.arch import get_adapter
from stages.sia import run_sia
from stages.training import encode_split, predict


def sia_for_config(cfg, log=print) -> dict[str, dict]:
    data = build_dataset(cfg.data)
    results = {}
    for model_cfg in cfg.models:
        model, tokenizer = load_model(
            model_cfg.ref,
            num_labels=len(CLASS_NAMES),
            trust_remote_code=model_cfg.trust_remote_code,
            dtype=getattr(torch, model_cfg.dtype),
            progress=cfg.output.progress,
            data_cfg=cfg.data,
            task=cfg.task,
            seed=cfg.seed,
        )
        if model_cfg.finetune_steps:  # measure the model the job would prune, not a random head
            from runner.finetune import finetune_dense

            train = encode_split(data["train"], tokenizer, model_cfg.max_length)
            finetune_dense(
                model, train, model_cfg, cfg.seed, cfg.output.progress, log, data_cfg=cfg.data
            )
        calibration = encode_split(data["calibration"], tokenizer, model_cfg.max_length)
        if cfg.task == "embedding":  # the loss SIA perturbs is the distillation loss
            calibration = calibration.with_targets(predict(model, calibration))
        batches = list(calibration.batches(cfg.calibration.batch_size))
        result = run_sia(model, get_adapter(model), batches, cfg.sia, seed=cfg.seed)
        info = describe_model(model)
        results[model_cfg.output_name] = {"model": info, "ref": model_cfg.ref} | result
        verdict = "satisfied" if result["satisfied"] else "VIOLATED"
        parts = ", ".join(f"{g} {v:.3f}" for g, v in result["per_granularity"].items())
        log(
            f"{model_cfg.output_name} ({info['attention']}+{info['mlp']}): SIA {verdict}, score {result['score']:.3f} "
            f"(threshold {result['threshold']}; {parts})"
        )
    return results
