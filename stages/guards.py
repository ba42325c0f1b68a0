"""Numerical guards: never let a NaN/Inf model become the next version or the export."""

from __future__ import annotations

import torch


class NumericalError(RuntimeError):
    pass


def check_finite(model, batch: dict | None = None) -> None:
    """Raise NumericalError naming the first non-finite parameter, or non-finite logits on `batch`."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise NumericalError(f"non-finite values in parameter {name}")
    if batch is None:
        return
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        out = model(**inputs)
    model.train(was_training)
    values = getattr(out, "logits", None)
    values = values if values is not None else out.last_hidden_state
    if not torch.isfinite(values).all():
        raise NumericalError("non-finite outputs on a calibration batch")
