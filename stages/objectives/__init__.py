"""Objectives: what a model is asked to do, in the terms importance, recovery and evaluation need.

A task (runner/tasks) decides data, head and report; its objective decides the maths every stage
differentiates or measures, so the cascade never branches on the task:

* `outputs(model, batch)`: what the model produces for a batch (class logits, sentence embeddings,
  next-token logits);
* `loss(outputs, batch)`: the mean training and evaluation loss (recovery with `loss: ce`);
* `importance_loss(model, batch)`: the loss SUMMED over the batch's rows, which Taylor scores,
  `loss_delta`, the SIA check and guards use (sums of fixed micro-batches add up exactly across
  Ray workers);
* `kd_loss(outputs, teacher, batch, temperature, alpha)` with `make_teacher(model, split, spec)`:
  the dense or pre-stage model's outputs as a picklable lookup, so no second model copy is held
  (`TeacherSpec`: how much of a large output to keep, and the temperatures it is read at);
* `evaluate(model, split)`: the metrics of one split (`EvalResult`).

Objectives are stateless and registered by name, so a Ray worker rebuilds one from its name.
Adding an objective = one new module here that calls `register_objective`.
"""

# Built-in objectives register themselves on import.
from stages.objectives import causal_lm, classification, embedding  # noqa: E402,F401,I001
from stages.objectives.base import (
    CachedOutputs,
    Objective,
    Teacher,
    TeacherSpec,
    get_objective,
    model_device,
    objective_names,
    predict,
    register_objective,
)

__all__ = [
    "CachedOutputs",
    "Objective",
    "Teacher",
    "TeacherSpec",
    "get_objective",
    "model_device",
    "objective_names",
    "predict",
    "register_objective",
]
