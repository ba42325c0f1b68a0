"""One decoder layer at a time: the worker of the layer-streamed pruning path.

Why: a model that does not fit in memory can still be scored the way FLAP / Wanda / SparseGPT
calibrate: the hidden states of the calibration rows are carried from layer to layer, and only
the layer being scored is materialised. A `LayerStreamWorker` holds whole calibration
micro-batches (its shard of the rows), and per layer: `load_layer(i)` reads that layer's
weights lazily from the source safetensors and replays the cuts already planned on it,
`statistics(request)` runs the layer on its rows and returns additive per-micro-batch sums, and
`advance()` makes the layer's outputs the next layer's inputs. Micro-batches stay whole, so
every layer runs on exactly the tensors the in-memory forward sees, and the driver, adding the
per-batch sums in global batch order, gets bit-for-bit the in-memory totals with any number of
workers.

What each layer's forward needs besides the hidden states (attention masks per layer type,
rotary position embeddings, position ids) is captured once per pass by running the model's own
backbone forward with every layer replaced by a recorder: masks and rotary embeddings are
computed by the model's code, not re-implemented here.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from stages.arch import get_adapter
from stages.arch.base import backbone
from stages.base import PrunePlan, apply_plan, set_out_projection
from stages.compensation import CompensationSettings, Refit
from stages.criteria import get_criterion
from stages.estimate import EstimateRequest
from stages.statistics import get_statistic
from stages.streaming.compensate import CompensationPass
from stages.streaming.layer_view import LayerView, from_layer, to_layer
from stages.streaming.lazy_weights import LazyCheckpoint, meta_skeleton, module_name

Stats = dict[str, torch.Tensor]
Part = tuple[int, Stats]  # (global micro-batch index, that batch's sums)


class StreamWorkerError(ValueError):
    """The streamed path cannot run this model or request (the message says what to do)."""


@dataclass(frozen=True)
class StreamSpec:
    """What every worker needs to rebuild the same model lazily (picklable, sent to Ray actors)."""

    source_dir: str
    device: str = "cpu"
    compute_dtype: torch.dtype | None = None  # None: compute in each tensor's stored dtype
    attn_implementation: str | None = None
    torch_threads: int | None = None


@dataclass(frozen=True)
class LayerOp:
    """One planned cut of one layer, replayed on its freshly read weights."""

    granularity: str
    keep: tuple[int, ...]
    full: bool  # every unit kept: nothing to slice
    bias: bool  # the plan's refit added out-projection biases (every layer gets them)
    refit: Refit | None = None  # the plan's refit tensors (read when the layer is replayed)
    plan_layer: int = 0  # this layer's index in the plan (its version_in numbering)


def layer_history(plans: Sequence[PrunePlan], n_layers: int) -> list[tuple[int, tuple]]:
    """For each layer of the model after `plans`: (its index in the source, its cuts in order)."""
    current: list[tuple[int, tuple]] = [(i, ()) for i in range(n_layers)]
    for plan in plans:
        if plan.granularity == "layers":
            dropped = set(plan.drop_layers)
            current = [c for j, c in enumerate(current) if j not in dropped]
            continue
        bias = bool(plan.compensation.get("adds_bias"))
        updated = []
        for j, (origin, ops) in enumerate(current):
            keep = tuple(int(u) for u in plan.keep[j])
            full = len(keep) == len(plan.scores[j])
            refit = plan.refit if plan.refit is not None and j in plan.refit.layers() else None
            if not full or bias or refit is not None:
                ops = (*ops, LayerOp(plan.granularity, keep, full, bias, refit, j))
            updated.append((origin, ops))
        current = updated
    return current


class LayerSource:
    """The source checkpoint, read lazily, and its dense model skeleton on the meta device."""

    def __init__(self, source_dir: str, attn_implementation: str | None = None):
        self.checkpoint = LazyCheckpoint(source_dir)
        self.dense = meta_skeleton(self.checkpoint, attn_implementation)
        self.adapter = get_adapter(self.dense)
        self.prefix = module_name(self.dense, self.adapter.layers(self.dense))
        self.n_layers = len(self.adapter.layers(self.dense))

    def current(self, plans: Sequence[PrunePlan]) -> tuple[nn.Module, list]:
        """A meta skeleton with `plans` applied (shapes, costs, config) and each layer's history."""
        model = copy.deepcopy(self.dense)
        for plan in plans:
            apply_plan(model, self.adapter, plan)
        return model, layer_history(plans, self.n_layers)

    def materialise(
        self, model: nn.Module, i: int, history: tuple[int, tuple], dtype: torch.dtype | None
    ) -> nn.Module:
        """Put real weights into layer i of `model` (read, cast, cut); returns the meta layer.

        Reads the layer's source tensors, builds it in the dense layout, renumbers layer_idx,
        then replays its cuts with the adapter exactly as `apply_plan` performed them.
        """
        origin, ops = history
        layers = self.adapter.layers(model)
        layer = copy.deepcopy(self.adapter.layers(self.dense)[origin])
        state = {}
        for name, tensor in layer.state_dict().items():
            full = f"{self.prefix}.{origin}.{name}"
            if full in self.checkpoint:
                cast = dtype if dtype is not None and tensor.is_floating_point() else None
                state[name] = self.checkpoint.read(full, cast)
            elif tensor.device.type == "meta":
                self.checkpoint.read(full)  # raises, naming the missing tensor
        layer.load_state_dict(state, strict=False, assign=True)
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
        meta_layer = layers[i]
        layers[i] = layer
        try:
            with torch.no_grad():
                for op in ops:
                    self._replay(model, i, layer, op)
        except BaseException:
            layers[i] = meta_layer
            raise
        return meta_layer

    def _replay(self, model: nn.Module, i: int, layer: nn.Module, op: LayerOp) -> None:
        """One cut, as `apply_plan` performs it: units, then the refitted projection."""
        adapter = self.adapter
        if not op.full:
            if op.granularity == "heads":
                adapter.prune_attention(model, i, list(op.keep))
            else:
                adapter.prune_mlp(model, i, list(op.keep))
        module = adapter.out_proj(layer, op.granularity)
        if op.bias and getattr(module, "bias", None) is None:
            adapter.ensure_out_proj_bias(model, op.granularity)
        if op.refit is not None:
            set_out_projection(model, adapter, i, op.granularity, op.refit.get(op.plan_layer))

    def restore(self, model: nn.Module, i: int, meta_layer: nn.Module) -> None:
        """Put the meta layer back (the real weights are freed with the last reference)."""
        self.adapter.layers(model)[i] = meta_layer


class _Stop(Exception):
    """Raised by the last recorder: the backbone forward has given every layer its inputs."""


class _Recorder(nn.Module):
    def __init__(self, idx: int, record: dict, last: bool):
        super().__init__()
        self.idx, self.record, self.last = idx, record, last

    def forward(self, *args, **kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.record[self.idx] = (tuple(args[1:]), kwargs)
        if self.idx == 0:
            self.record["hidden"] = hidden
        if self.last:
            raise _Stop
        return hidden


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, nn.Parameter(tensor, requires_grad=False))


def _zero_stats(batch: dict) -> Stats:
    mask = batch["attention_mask"]
    return {
        "rows": torch.tensor(float(mask.shape[0])).to(torch.float64),
        "tokens": mask.bool().sum().to(torch.float64),
    }


def add_into(total: Stats, part: Stats) -> None:
    """total += part key by key in sorted key order, float64 on CPU (the in-memory `_add` rule)."""
    for key in sorted(part):
        value = part[key].detach().to(torch.float64).cpu()
        total[key] = total[key] + value if key in total else value


def reduce_parts(parts: Sequence[Part]) -> Stats:
    """Sum per-micro-batch parts in global batch order: the order the in-memory path adds them."""
    total: Stats = {}
    for _, part in sorted(parts, key=lambda p: p[0]):
        add_into(total, part)
    return total


class LayerStreamWorker:
    """Holds whole calibration micro-batches (global index, batch) and streams layers over them.

    Call order per pass: begin_pass(plans) -> for each layer: load_layer(i), statistics(request),
    [scores(request, totals)], advance(). `running_sum=True` (a worker holding every batch)
    returns one part already summed in batch order instead of one part per batch.
    """

    def __init__(self, spec: StreamSpec, batches: Sequence[Part], *, running_sum: bool = False):
        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        self.source = LayerSource(spec.source_dir, spec.attn_implementation)
        self.adapter = self.source.adapter
        self.device = torch.device(spec.device)
        self.dtype = spec.compute_dtype
        self.batches = [
            (int(idx), {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
            for idx, b in sorted(batches, key=lambda p: p[0])
        ]
        self.running_sum = running_sum
        self.model: nn.Module | None = None
        self.history: list = []
        self.hidden: list[torch.Tensor] | None = None
        self.calls: list[dict] | None = None
        self.layer_idx: int | None = None
        self._meta_layer: nn.Module | None = None
        self._outputs: list[torch.Tensor | None] | None = None
        self._batch = 0
        self._compensation: CompensationPass | None = None

    # ---- a pass --------------------------------------------------------------------------------
    def begin_pass(self, plans: Sequence[PrunePlan], activations: bool = True) -> int:
        """Rebuild the model after `plans` (meta) and, if asked, the first layer's inputs."""
        self.unload()
        self.model, self.history = self.source.current(plans)
        self.hidden = self.calls = None
        if activations:
            self._first_inputs()
        return len(self.history)

    def _first_inputs(self) -> None:
        """Run the backbone's own forward up to the layers, recording what each layer receives."""
        model, checkpoint = self.model, self.source.checkpoint
        embedding = model.get_input_embeddings()
        if type(embedding) is not nn.Embedding:
            raise StreamWorkerError(
                f"{checkpoint.directory}: input embedding {type(embedding).__name__} is not a "
                "plain nn.Embedding; the streamed path supports decoder families with one "
                "(llama, mistral, qwen2, qwen3, phi3, gpt2, opt, gpt_neox)"
            )
        embed_name = module_name(model, embedding) + ".weight"
        base = backbone(model)
        base_name = module_name(model, base)
        layers = self.adapter.layers(model)
        for name, param in list(model.named_parameters()):
            inside = not base_name or name.startswith(base_name + ".")
            if inside and name != embed_name and not name.startswith(self.source.prefix + "."):
                # small non-layer backbone weights (final norm, position embeddings)
                _set_param(model, name, checkpoint.read(name, self._cast(param)).to(self.device))
        originals = list(layers)
        record: dict = {}
        for i in range(len(layers)):
            layers[i] = _Recorder(i, record, last=i == len(layers) - 1)
        self.hidden, self.calls = [], []
        try:
            for _, batch in self.batches:
                ids = batch["input_ids"]
                rows, inverse = torch.unique(ids, return_inverse=True)
                table = checkpoint.read_rows(embed_name, rows, self._cast(embedding.weight))
                embeds = table[inverse].to(self.device)
                record.clear()
                with torch.no_grad():
                    try:
                        base(
                            inputs_embeds=embeds,
                            attention_mask=batch["attention_mask"].to(self.device),
                        )
                    except _Stop:
                        pass
                self.hidden.append(record.pop("hidden"))
                self.calls.append(dict(record))
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer

    def _cast(self, param: torch.Tensor) -> torch.dtype | None:
        return self.dtype if self.dtype is not None and param.is_floating_point() else None

    # ---- one layer -----------------------------------------------------------------------------
    def load_layer(self, i: int) -> None:
        """Materialise layer i (weights read from the source, cut as planned) on the device."""
        self.unload()
        if not 0 <= i < len(self.history):
            raise StreamWorkerError(f"layer {i} out of range [0, {len(self.history)})")
        self._meta_layer = self.source.materialise(self.model, i, self.history[i], self.dtype)
        self.adapter.layers(self.model)[i].to(self.device)
        self.layer_idx = i

    def unload(self) -> None:
        if self.layer_idx is not None:
            self.source.restore(self.model, self.layer_idx, self._meta_layer)
        self.layer_idx = self._meta_layer = self._outputs = None

    def _layer(self) -> nn.Module:
        if self.layer_idx is None:
            raise StreamWorkerError("no layer loaded: call load_layer(i) first")
        return self.adapter.layers(self.model)[self.layer_idx]

    def _forward(self, b: int, layer: nn.Module | None = None, hidden=None) -> torch.Tensor:
        """Micro-batch b through the loaded layer (or `layer`) from its carried (or `hidden`)
        inputs, with the masks and rotary embeddings the model's own forward computed."""
        args, kwargs = self.calls[b][self.layer_idx]
        # a fresh cache per call, as the in-memory forward's first (and only) step sees (GPT-2
        # passes it positionally); a layer run twice on one batch must not see its own keys
        args = tuple(self._fresh(a) for a in args)
        kwargs = {k: self._fresh(v) for k, v in kwargs.items()}
        layer = self._layer() if layer is None else layer
        out = layer(self.hidden[b] if hidden is None else hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def _fresh(self, value):
        return DynamicCache(config=self.model.config) if isinstance(value, DynamicCache) else value

    def _view(self) -> LayerView:
        return LayerView(self.model, self.adapter, self._layer(), self._view_forward)

    def _view_forward(self) -> torch.Tensor:
        out = self._forward(self._batch)
        self._outputs[self._batch] = out
        return out

    def statistics(self, request: EstimateRequest) -> list[Part]:
        """Run the criterion's registered statistics on the loaded layer, per held micro-batch.

        The layer is wrapped as a one-layer model (`stages.streaming.layer_view`), so each
        `collect` is the one the in-memory path runs; the sums come back under this layer's keys.
        """
        i = self._layer_idx_loaded()
        collectors = [get_statistic(n) for n in get_criterion(request.criterion).statistics]
        if collectors and self.hidden is None:
            raise StreamWorkerError(
                "begin_pass(plans, activations=True) is needed for this request"
            )
        view = self._view()
        self._outputs = [None] * len(self.batches)
        parts: list[Part] = []
        for b, (idx, batch) in enumerate(self.batches):
            part = _zero_stats(batch)
            self._batch = b
            on_device = {k: v.to(self.device) for k, v in batch.items()}
            for collector in collectors:
                collector.collect(view, self.adapter, on_device, request.granularity, None, part)
            part = to_layer(part, i)
            if self.running_sum and parts:
                add_into(parts[0][1], part)
            else:
                parts.append((idx, part))
        if not collectors:
            self._outputs = None
        return parts

    def scores(self, request: EstimateRequest, totals: Stats) -> torch.Tensor:
        """The registered criterion's score of the loaded layer from the reduced totals.

        Units: a float64 [units] tensor; layers: this layer's one score (as the criterion's dtype).
        """
        i = self._layer_idx_loaded()
        view = self._view()
        score = get_criterion(request.criterion).score(
            view, self.adapter, from_layer(totals, i), request.granularity
        )[0]
        if request.granularity == "layers":
            return score.detach().cpu()
        return score.detach().to(torch.float64).cpu()

    def _layer_idx_loaded(self) -> int:
        self._layer()  # raises when no layer is loaded
        return self.layer_idx

    def advance(self) -> None:
        """The loaded layer's outputs become the next layer's inputs; the layer is unloaded."""
        if self.hidden is not None:
            outputs = self._outputs or [None] * len(self.batches)
            with torch.no_grad():
                self.hidden = [
                    out if out is not None else self._forward(b) for b, out in enumerate(outputs)
                ]
        self.unload()

    # ---- a compensation pass (stages/streaming/compensate.py) -----------------------------------
    def begin_compensation(
        self, plans: Sequence[PrunePlan], plan: PrunePlan, settings: CompensationSettings
    ) -> int:
        """Start refitting `plan` (made on the model after `plans`); returns the layer count."""
        self._compensation = CompensationPass(self, plans, plan, settings)
        return self._compensation.n_layers

    def compensation_step(self, i: int) -> list[Part]:
        return self._compensation.step(i)

    def compensation_fit(self, totals: Stats):
        return self._compensation.fit(totals)

    def compensation_advance(self, tensors) -> None:
        self._compensation.advance(tensors)

    def step(self, i: int, request: EstimateRequest) -> list[Part]:
        """load_layer(i) + statistics(request): one round trip for remote workers."""
        self.load_layer(i)
        return self.statistics(request)
