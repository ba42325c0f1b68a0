"""Architecture adapters: where layers / attention units / FFN channels live, how to slice them.

`get_adapter(model_or_config)` picks the adapter by config.model_type. The family modules hold
the details (llama: Llama/Mistral/Qwen2, qwen3, phi3, gpt2, opt, neox, bert, roberta,
distilbert); base holds the shared pruning, resizing and cost logic, slicing the module-level
tensor surgery. This module is the package's API: the registry, keyed by model_type.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import PretrainedConfig

from stages.arch.base import ArchAdapter, LayerLayout, UnsupportedArchitecture, unwrap_model
from stages.arch.bert import BertAdapter
from stages.arch.distilbert import DistilBertAdapter
from stages.arch.gpt2 import GPT2Adapter
from stages.arch.llama import LlamaAdapter
from stages.arch.neox import GPTNeoXAdapter
from stages.arch.opt import OPTAdapter
from stages.arch.phi3 import Phi3Adapter
from stages.arch.qwen3 import Qwen3Adapter
from stages.arch.roberta import RobertaAdapter
from stages.arch.slicing import UnitProjection, UnsupportedModule

_ADAPTERS: dict[str, type[ArchAdapter]] = {
    model_type: cls
    for cls in (
        LlamaAdapter,
        Qwen3Adapter,
        Phi3Adapter,
        GPT2Adapter,
        OPTAdapter,
        GPTNeoXAdapter,
        BertAdapter,
        RobertaAdapter,
        DistilBertAdapter,
    )
    for model_type in cls.model_types
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_ADAPTERS))


def find_adapter(model_type: str | None) -> ArchAdapter | None:
    """The adapter for a config.model_type, or None where none is registered."""
    cls = _ADAPTERS.get(model_type) if isinstance(model_type, str) else None
    return cls() if cls is not None else None


def model_types_where(capability: Callable[[ArchAdapter, str], object]) -> tuple[str, ...]:
    """Model types whose adapter has `capability(adapter, model_type)` (for messages that list
    what is supported), in registration order."""
    return tuple(t for t, cls in _ADAPTERS.items() if capability(cls(), t))


def get_adapter(model_or_config) -> ArchAdapter:
    """The adapter for a model (plain or peft-wrapped) or a config, by config.model_type."""
    if isinstance(model_or_config, PretrainedConfig):
        config = model_or_config
    else:
        config = getattr(unwrap_model(model_or_config), "config", None)
    model_type = getattr(config, "model_type", None)
    adapter = find_adapter(model_type)
    if adapter is None:
        raise UnsupportedArchitecture(
            f"unsupported architecture: model_type={model_type!r}; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return adapter


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ArchAdapter",
    "BertAdapter",
    "DistilBertAdapter",
    "GPT2Adapter",
    "GPTNeoXAdapter",
    "LayerLayout",
    "LlamaAdapter",
    "OPTAdapter",
    "Phi3Adapter",
    "Qwen3Adapter",
    "RobertaAdapter",
    "UnitProjection",
    "UnsupportedArchitecture",
    "UnsupportedModule",
    "find_adapter",
    "get_adapter",
    "model_types_where",
]
