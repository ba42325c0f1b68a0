"""The built-in demo family: tiny GPT-2 / Llama classifiers trained here on the bearing task.

No hub access is needed: the tokenizer is a WordLevel vocabulary built from the training texts and
the models are trained on the synthetic bearing data, then cached on disk, keyed by everything that
shapes their weights (spec, data settings, training settings, code version).
"""

from __future__ import annotations

import hashlib
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
from safetensors import SafetensorError
from tokenizers import Tokenizer, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from runner.data.bearing import CLASS_NAMES, DataConfig, build_dataset
from runner.paths import cache_root
from stages.base import param_count
from stages.checkpoint import CheckpointError, checkpoint_directory, verify_manifest
from stages.objectives import get_objective
from stages.split import encode_split
from stages.training import TrainSettings, train_steps, training_loss


class DemoModelError(ValueError):
    """An unknown demo model name or a demo spec that cannot be built."""


CODE_VERSION = "demo-v1"  # bump when demo training code changes, to invalidate caches
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
DEMO_MAX_POSITIONS = 96
_MARKER = "demo_model.json"


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
    raise DemoModelError(f"demo spec {spec.name!r}: unknown family {spec.family!r}")


# ----------------------------------------------------------------------------- demo models


def _demo_train_settings(spec: DemoSpec) -> TrainSettings:
    return TrainSettings(spec.train_steps, spec.lr, spec.batch_size, weight_decay=0.01, seed=0)


def training_data_cfg(data_cfg: Any) -> Any:
    """The bearing settings that shape the train split (a job's data section may hold more, e.g.
    text sources); calibration settings do not change it: one trained model serves them all."""
    bearing = {k: v for k, v in data_cfg.model_dump().items() if k in DataConfig.model_fields}
    defaults = DataConfig()
    return DataConfig.model_validate(
        bearing | {"calibration_size": defaults.calibration_size, "calibration_mix": []}
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
    if name not in DEMO_MODELS:
        raise DemoModelError(f"unknown demo model {name!r}; known: {', '.join(DEMO_MODELS)}")
    spec = DEMO_MODELS[name]
    data_cfg = training_data_cfg(data_cfg if data_cfg is not None else DataConfig())
    target = cache_root(cache_dir) / f"{name}-{demo_cache_key(spec, data_cfg)}"
    damaged = _damaged(target, name, progress)
    if target.is_dir() and not damaged:
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
    settings = _demo_train_settings(spec)
    objective = get_objective("classification")
    train_steps(model, train, settings, training_loss(objective, settings, None))
    seconds = time.perf_counter() - started
    result = objective.evaluate(model, test, num_labels=len(CLASS_NAMES))
    model.eval()
    if progress:
        print(
            f"[cascade] demo {name}: {param_count(model):,} params, trained {spec.train_steps} "
            f"steps in {seconds:.1f}s, dense test accuracy {result.accuracy:.3f}",
            file=sys.stderr,
        )
    info = {"name": name, "train_seconds": seconds, "test_accuracy": result.accuracy}
    try:
        _save_atomically(model, tokenizer, target, info, replace=damaged)
    except (OSError, SafetensorError) as exc:  # the cache only saves time (e.g. a full disk)
        print(
            f"[cascade] WARNING: could not cache demo {name} in {target.parent}: {exc}",
            file=sys.stderr,
        )
    model.config.name_or_path = name
    return model, tokenizer


def _damaged(target: Path, name: str, progress: bool) -> bool:
    """A cache entry that exists but fails its manifest (truncated, edited, written by a version
    without manifests) is trained again, like the SmolLM2 cache: never loaded."""
    if not target.is_dir():
        return False
    try:
        verify_manifest(target)
    except CheckpointError as err:
        if progress:
            print(f"[cascade] demo {name}: cached copy failed verification ({err}); training it "
                  "again", file=sys.stderr)  # fmt: skip
        return True
    return not (target / _MARKER).is_file()


def _save_atomically(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    target: Path,
    info: dict,
    *,
    replace: bool,
) -> None:
    """Write the cache entry beside `target` (manifest.json last), then rename; a racing
    writer's valid copy wins, a damaged entry (`replace`) is replaced."""
    with checkpoint_directory(target, keep_existing=not replace) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(info, indent=2))


def _load_cached_demo(path: Path, name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.config.name_or_path = name  # reports show the demo name, not the cache path
    model.eval()
    return model, tokenizer
