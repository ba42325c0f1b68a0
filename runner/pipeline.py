"""One model's cascade: calibrate -> SIA -> [prune -> recover]* -> export -> evaluate the export.

Importance for a prune stage is requested only after the previous stage finished and every
executor worker has loaded the resulting model version (the barrier), so stage k+1 always scores
the model that came out of recovery k.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from cluster.executor import make_executor
from runner.config import JobConfig, ModelConfig, PruneStageConfig, RecoverStageConfig, stage_names
from runner.data import CLASS_NAMES, build_dataset
from runner.errors import JobError
from runner.events import EventLog
from runner.finetune import finetune_dense
from runner.models import count_params, describe_model, load_model, source_dir
from runner.preflight import preflight
from runner.progress import step_bar
from runner.prune_stages import PruneStagesMixin
from runner.stage_store import StageStore
from stages.arch import get_adapter
from stages.checkpoint import load_pruned
from stages.guards import check_finite
from stages.recover import RecoverySettings, recover
from stages.training import encode_split, evaluate, predict

SPLITS = ("train", "validation", "test", "heldout", "calibration")


def chance_level_warning(accuracy: float, classes: int, what: str) -> str | None:
    """A dense model no better than guessing makes every pruning figure meaningless: say so loudly."""
    chance = 1.0 / max(classes, 1)
    if classes < 2 or accuracy > 1.5 * chance:
        return None
    return (
        f"the dense model's {what} test accuracy {accuracy:.4f} is at chance level ({chance:.4f} for "
        f"{classes} classes): compression figures say nothing about it; check the model, the data "
        "and, for a fine-tuned head, finetune_steps/finetune_lr"
    )


class ModelRun(PruneStagesMixin):
    def __init__(self, cfg: JobConfig, model_cfg: ModelConfig, out_dir: Path, *, resume: bool, log):
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.out = Path(out_dir)
        self.resume = resume
        self.log = log
        self.events = EventLog(self.out / "events.jsonl")
        self.store = StageStore(self.out / "stages")
        self.records: list[dict] = []
        self.version = 0
        self.dense_estimates: dict = {}
        self.layer_origin: list[int] = []
        self.teacher: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------- setup
    def _setup(self) -> None:
        cfg = self.cfg
        dtype = getattr(torch, self.model_cfg.dtype)
        self.model, self.tokenizer = load_model(
            self.model_cfg.ref,
            num_labels=len(CLASS_NAMES),
            trust_remote_code=self.model_cfg.trust_remote_code,
            dtype=dtype,
            progress=cfg.output.progress,
            data_cfg=cfg.data,
            task=cfg.task,
            seed=cfg.seed,
        )
        self.adapter = get_adapter(self.model)
        data = build_dataset(cfg.data)
        self.splits = {
            name: encode_split(data[name], self.tokenizer, self.model_cfg.max_length)
            for name in SPLITS
        }
        if cfg.task == "embedding":  # every split carries the dense embeddings it is distilled to
            self.splits = {
                k: v.with_targets(predict(self.model, v)) for k, v in self.splits.items()
            }
        n_cal = len(self.splits["calibration"])
        if n_cal < cfg.calibration.min_samples:
            raise JobError(
                f"calibration set has {n_cal} rows, fewer than calibration.min_samples="
                f"{cfg.calibration.min_samples} (data.calibration_size)"
            )
        self.calibration = list(self.splits["calibration"].batches(cfg.calibration.batch_size))
        self.executor = make_executor(cfg.cluster, self.adapter)
        self.executor.set_calibration(self.calibration)
        self.finetune = self._finetune_dense()
        self.dense_params = count_params(self.model)
        self.layer_origin = list(range(len(self.adapter.layers(self.model))))
        self.model_info = describe_model(self.model) | {"name": self.model_cfg.ref}
        self.dense_eval = {
            s: evaluate(self.model, self.splits[s]) for s in ("validation", "test", "heldout")
        }
        self.warnings = self._dense_warnings()
        self.perplexity = self._perplexity_probe()
        self.dense_perplexity = self.perplexity.measure(self.model) if self.perplexity else None
        self.params_target = self._params_target()
        preflight(
            cfg, self.model_cfg.ref, self.model, self.adapter, self.dense_params, self.params_target
        )
        if any(
            isinstance(s, RecoverStageConfig) and s.loss == "kd" and s.teacher == "dense"
            for s in cfg.stages
        ):
            self.teacher["dense"] = self._logits(self.splits["train"])

    def _dense_warnings(self) -> list[str]:
        test = self.dense_eval["test"]
        what = "1-NN" if test.cosine is not None else "classification"
        warning = chance_level_warning(test.accuracy, len(test.confusion), what)
        if warning is None:
            return []
        self.log(f"WARNING: {warning}")
        return [warning]

    def _finetune_dense(self) -> dict | None:
        return finetune_dense(
            self.model, self.splits["train"], self.model_cfg, self.cfg.seed,
            self.cfg.output.progress, self.log, data_cfg=self.cfg.data,
        )  # fmt: skip

    def _perplexity_probe(self):
        if self.cfg.evaluation.perplexity_file is None:
            return None
        source = source_dir(self.model_cfg.ref)
        if source is None:
            raise JobError(
                f"evaluation.perplexity_file: demo model {self.model_cfg.ref!r} is a classifier "
                "trained from scratch and has no language-model head; use a causal-LM checkpoint"
            )
        from runner.lm_head import PerplexityProbe

        return PerplexityProbe(
            self.cfg.evaluation, source, self.model_cfg.ref, self.tokenizer, self.model
        )

    def _params_target(self) -> int | None:
        target = self.cfg.target
        if target.ratio is not None:
            return int(self.dense_params / target.ratio)
        if target.device is not None or target.budget_bytes is not None:
            from stages.validate import params_for_budget

            return params_for_budget(self.model, target, self.cfg)
        return None

    def _logits(self, split) -> torch.Tensor:
        return predict(self.model, split)

    # ---------------------------------------------------------------- main
    def run(self) -> dict:
        start = time.perf_counter()
        try:
            return self._run(start)
        finally:
            executor = getattr(self, "executor", None)
            if executor is not None:
                executor.close()

    def _run(self, start: float) -> dict:
        self._setup()
        first = 0
        if self.resume:
            first = self._restore()
        else:
            self.events.emit(
                "job_start",
                version=0,
                model=self.model_info,
                dense_params=self.dense_params,
                dense_accuracy=self.dense_eval["test"].accuracy,
                finetune=self.finetune,
                warnings=self.warnings,
            )
        self._sync_workers(stage=None)
        if first == 0:
            self._estimate_dense_upfront()
        self.sia = self._run_sia() if first == 0 else self.store.load_extra("sia") or {}
        steps = self.cfg.sia.shrink_steps if self._sia_shrinks() else 1
        names = stage_names(self.cfg.stages)
        for idx, stage in enumerate(self.cfg.stages):
            if idx < first:
                continue
            name = names[idx]
            t0 = time.perf_counter()
            if isinstance(stage, PruneStageConfig):
                plans, before = self._prune(idx, stage, name, steps)
                extra = {"plan": plans}
            else:
                before, metrics = self._recover(idx, stage, name)
                extra = {"recovery": metrics}
            record = self._record(idx, stage, name, before, time.perf_counter() - t0)
            self.store.save(
                idx,
                name,
                self.model if self.cfg.output.save_stage_models else None,
                self.tokenizer,
                record,
                extra,
            )
            self.records.append(record)
        return self._finish(start)

    def _sync_workers(self, stage: str | None) -> None:
        ckpt = self.store.model_dir_of(self.version)
        self.executor.load_version(self.version, self.model, str(ckpt) if ckpt else None)
        workers = self.executor.barrier(self.version)
        self.events.emit(
            "barrier",
            stage=stage,
            version=self.version,
            workers=[{"worker": w.worker, "version": w.version} for w in workers],
        )

    def _sia_shrinks(self) -> bool:
        return (
            bool(self.sia)
            and not self.sia.get("satisfied", True)
            and self.cfg.sia.policy == "shrink"
        )

    def _run_sia(self) -> dict:
        if not self.cfg.sia.enabled:
            return {}
        from stages.sia import run_sia

        result = run_sia(
            self.model, self.adapter, self.calibration, self.cfg.sia, seed=self.cfg.seed
        )
        self.events.emit("sia", version=self.version, **result)
        self.store.save_extra("sia", result)
        if not result["satisfied"]:
            self.log(
                f"WARNING: SIA violated for {self.model_cfg.ref} (score {result['score']:.3f} > "
                f"threshold {result['threshold']}): per-component scores are unreliable; "
                f"policy={self.cfg.sia.policy}"
            )
            if self.cfg.sia.policy == "stop":
                raise JobError(f"SIA violated (score {result['score']:.3f}) and sia.policy is stop")
        return result

    # ---------------------------------------------------------------- stages
    def _recover(self, idx, stage: RecoverStageConfig, name: str):
        before = self._snapshot()
        teacher = self.teacher.get(stage.teacher) if stage.loss == "kd" else None
        if stage.loss == "kd" and teacher is None:
            teacher = self.teacher.setdefault("dense", self._logits(self.splits["train"]))
        settings = RecoverySettings.from_stage(stage, seed=self.cfg.seed + idx)
        self.events.emit(
            "recover_start",
            stage=name,
            version=self.version,
            steps=stage.steps,
            method=stage.method,
            runner=stage.runner,
        )
        if stage.runner == "ray_train":
            from cluster.train import recover_distributed

            self.model, metrics = recover_distributed(
                self.model,
                self.adapter,
                self.splits["train"],
                settings,
                teacher,
                self.cfg.cluster,
                stage.strategy,
            )
        else:
            label = f"{self.model_cfg.ref} {name}"
            with step_bar(settings.steps, label, self.cfg.output.progress) as on_step:
                self.model, metrics = recover(
                    self.model, self.adapter, self.splits["train"], settings, teacher, on_step
                )
        check_finite(self.model, self.calibration[0])
        self.version += 1
        self.events.emit(
            "recover_end",
            stage=name,
            version=self.version,
            first_loss=metrics.get("first_loss"),
            last_loss=metrics.get("last_loss"),
        )
        self._sync_workers(name)
        return before, {k: v for k, v in metrics.items() if k != "losses"} | {
            "losses": metrics["losses"][::10]
        }

    # ---------------------------------------------------------------- records
    def _snapshot(self) -> dict:
        return {"params": count_params(self.model), "version": self.version}

    def _record(self, idx, stage, name, before, seconds) -> dict:
        val = evaluate(self.model, self.splits["validation"])
        return {
            "index": idx,
            "name": name,
            "kind": stage.kind,
            "version": self.version,
            "params_before": before["params"],
            "params_after": count_params(self.model),
            "accuracy": val.accuracy,
            "macro_f1": val.macro_f1,
            **({"cosine": val.cosine} if val.cosine is not None else {}),
            "seconds": round(seconds, 3),
            "criterion": getattr(stage, "criterion", None),
            "layer_origin": list(self.layer_origin),
        }

    def _restore(self) -> int:
        state = self.store.last_complete()
        if state is None:
            self.events.emit("job_start", version=0, model=self.model_info, resumed=True)
            return 0
        idx, model_dir, records = state
        if model_dir is None:
            raise JobError(
                "cannot --resume: stage models were not saved (output.save_stage_models=false)"
            )
        self.model = load_pruned(
            model_dir, attn_implementation=self.model.config._attn_implementation
        )
        self.records = records
        self.version = records[-1]["version"]
        self.layer_origin = records[-1]["layer_origin"]
        self.events.emit("resume", version=self.version, after_stage=records[-1]["name"])
        self.log(
            f"resuming {self.model_cfg.ref} after stage {records[-1]['name']} (version {self.version})"
        )
        return idx + 1

    def _finish(self, start: float) -> dict:
        from runner.finish import finish_model_run

        return finish_model_run(self, start)
