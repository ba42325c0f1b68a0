"""Save and load pruned checkpoints with per-layer shapes, atomically and with an integrity manifest.

One Hugging Face directory: model*.safetensors (+ index when sharded), config.json with a
"pruning" section (family, per-layer layout, whether plain transformers can load it), tokenizer
files and manifest.json (sha256 + size of every file), written last. A uniform layout that the
vanilla config can express also loads with plain `AutoModelFor*.from_pretrained`; any layout
loads with `load_pruned`, which rebuilds the architecture on the meta device, resizes each layer
and assigns the stored tensors. Never torch.load, never remote code.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from stages.arch import LayerLayout, get_adapter
from stages.atomic import atomic_directory, fsync_dir

MANIFEST = "manifest.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MANIFEST_FORMAT = "cascade-runner-manifest/1"
RESERVED_KEYS = ("family", "layout", "uniform", "vanilla_loadable")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
)


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read (the message names the path or file)."""


class DiskFullError(CheckpointError):
    """The filesystem ran out of space (or quota) while a checkpoint was written; nothing of the
    new checkpoint was left behind (the message names the path and the space needed)."""


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, as an OSError or as safetensors' Rust IoError text."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return any(
        sign in text for sign in ("No space left", "StorageFull", "code: 28", "Disk quota exceeded")
    )


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct tensors (parameters and buffers, shared ones once)."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.data_ptr())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def free_bytes(path: Path) -> int | None:
    """Free space on the filesystem that holds `path` (its nearest existing ancestor)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def _mib(n: int | None) -> str:
    return "an unknown amount" if n is None else f"{n / 2**20:,.1f} MiB"


def disk_full_error(out: Path, model: nn.Module, what: str = "the checkpoint") -> DiskFullError:
    """One line: where, how much the model's weights need, how much is free there."""
    needed, free = model_bytes(model), free_bytes(Path(out))
    return DiskFullError(
        f"{out}: No space left on device while writing {what}: it needs about "
        f"{_mib(needed)} (the model's weights), {_mib(free)} free there; free some space or "
        "write to another disk"
    )


# ---- writing ----------------------------------------------------------------------------------
def pruning_config(model: PreTrainedModel, require_uniform: bool, metadata: dict | None, out: Path):
    adapter = get_adapter(model)
    layouts = adapter.layout(model)
    config = copy.deepcopy(model.config)  # never touch the live model's config
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) != len(layouts):
        raise CheckpointError(
            f"{out}: config.layer_types has {len(layer_types)} entries for {len(layouts)} layers"
        )
    config.num_hidden_layers = len(layouts)
    uniform = all(layout == layouts[0] for layout in layouts)
    vanilla = adapter.write_uniform_config(config, layouts)
    if require_uniform and not vanilla:
        raise CheckpointError(
            f"{out}: require_uniform=True but the {adapter.family} layout is not expressible by a "
            f"vanilla config (uniform={uniform}; layers: {[asdict(x) for x in layouts]})"
        )
    extra = dict(metadata or {})
    clash = sorted(set(extra) & set(RESERVED_KEYS))
    if clash:
        raise CheckpointError(f"{out}: metadata keys {clash} are reserved for the pruning section")
    try:
        json.dumps(extra)
    except TypeError as err:
        raise CheckpointError(f"{out}: metadata is not JSON-serialisable ({err})") from err
    config.pruning = {
        "family": adapter.family,
        "layout": [asdict(x) for x in layouts],
        "uniform": uniform,
        "vanilla_loadable": vanilla,
        **extra,
    }
    config.architectures = [type(model).__name__]
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    if first is not None:
        config.dtype = first.dtype
    return config


def tied_pairs(model: nn.Module) -> dict[str, str]:
    """{tied parameter: the parameter it shares} as transformers declares it for this model."""
    pairs = getattr(model, "all_tied_weights_keys", None)
    if pairs is None and hasattr(model, "get_expanded_tied_weights_keys"):
        pairs = model.get_expanded_tied_weights_keys(all_submodels=True)
    return dict(pairs or {})


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def weights_to_save(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """state_dict without tied copies (they are re-tied on load); other aliases are cloned."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for target, source in tied_pairs(model).items():
        if target in state and source in state and _same_storage(state[target], state[source]):
            del state[target]
    seen: set[int] = set()
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        state[name] = tensor.clone().contiguous() if ptr in seen else tensor.contiguous()
        seen.add(ptr)
    return state


def _write_weights(model: PreTrainedModel, directory: Path, max_shard_size: str) -> None:
    state = weights_to_save(model)
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        shard = {name: state[name].cpu() for name in names}  # one shard on the host at a time
        save_file(shard, str(directory / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
        (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def _write_manifest(directory: Path) -> None:
    """Fsync every file, then write manifest.json (sha256 + size) last."""
    entries = {}
    for name in _files(directory):
        path = directory / name
        _fsync_file(path)
        entries[name] = {"sha256": _sha256(path), "size": path.stat().st_size}
    manifest = directory / MANIFEST
    manifest.write_text(
        json.dumps({"format": MANIFEST_FORMAT, "files": entries}, indent=2, sort_keys=True)
    )
    _fsync_file(manifest)
    fsync_dir(directory)


@contextmanager
def checkpoint_directory(out: Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """A temp dir to fill; then manifest.json is written LAST and the whole replaces `out`
    (keep_existing: a cache entry a racing writer put there first is kept instead).

    On any failure the temp dir is removed and whatever was at `out` stays as it was.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    with atomic_directory(out, keep_existing=keep_existing) as tmp:
        yield tmp
        _write_manifest(tmp)


def write_metadata(model, tokenizer, config, directory: Path) -> None:
    """config.json (with the pruning section), generation config and tokenizer files."""
    config.to_json_file(str(directory / "config.json"), use_diff=True)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and model.can_generate():
        generation_config.save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer,
    out_dir: str | Path,
    *,
    require_uniform: bool = False,
    metadata: dict | None = None,
    max_shard_size: str = "2GB",
) -> Path:
    """Write ONE loadable HF directory atomically (temp sibling dir, fsync, rename over)."""
    out = Path(out_dir)
    if hasattr(model, "peft_config"):
        raise CheckpointError(
            f"{out}: model carries peft adapters; merge them (merge_and_unload) before saving"
        )
    config = pruning_config(model, require_uniform, metadata, out)
    try:
        with checkpoint_directory(out) as tmp:
            _write_weights(model, tmp, max_shard_size)
            write_metadata(model, tokenizer, config, tmp)
    except (OSError, SafetensorError) as exc:
        if is_disk_full(exc):
            raise disk_full_error(out, model) from exc
        raise
    return out


# ---- verifying and reading ----------------------------------------------------------------------
def verify_manifest(path: str | Path) -> None:
    """Raise CheckpointError naming the first missing, changed or unexpected file."""
    directory = Path(path)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory}: missing file {MANIFEST}")
    files = _manifest_files(directory, manifest_path)
    for name, entry in sorted(files.items()):
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{directory}: missing file {name}")
        if file.stat().st_size != entry["size"] or _sha256(file) != entry["sha256"]:
            raise CheckpointError(
                f"{directory}: changed file {name} (sha256/size differ from {MANIFEST})"
            )
    extra = [name for name in _files(directory) if name != MANIFEST and name not in files]
    if extra:
        raise CheckpointError(f"{directory}: unexpected file {extra[0]} (not in {MANIFEST})")


def _manifest_files(directory: Path, manifest_path: Path) -> dict[str, dict]:
    """manifest.json's {file name: {"size": int, "sha256": str}}, or a CheckpointError saying
    what is wrong with it (a hand-edited manifest must not end in a KeyError)."""
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{directory}: unreadable {MANIFEST} ({type(err).__name__})") from err
    if not isinstance(files, dict) or not files:
        raise CheckpointError(
            f'{directory}: {MANIFEST} lists no files ("files" must map each file name to its '
            "size and sha256); export the checkpoint again"
        )
    for name, entry in files.items():
        plain = name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
        if not plain or not isinstance(entry, dict):
            raise CheckpointError(f"{directory}: {MANIFEST}: bad entry {name[:80]!r}")
        if type(entry.get("size")) is not int or not isinstance(entry.get("sha256"), str):
            raise CheckpointError(
                f"{directory}: {MANIFEST}: the entry for {name[:80]} has no integer size and "
                "sha256 string; export the checkpoint again"
            )
    return files


def _read_state(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / INDEX).is_file():
        weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for filename in sorted(set(weight_map.values())):
            state.update(load_file(str(directory / filename), device="cpu"))
        return state
    if not (directory / SINGLE).is_file():
        raise CheckpointError(f"{directory}: missing file {SINGLE}")
    return load_file(str(directory / SINGLE), device="cpu")


def model_class(config, where: str | Path = "config") -> type[PreTrainedModel]:
    """The transformers class named by config.architectures[0] (never remote code).

    A folder exported with `--remote-code` names its own class there (defined by the .py it
    ships, which is never imported here) and the transformers class it extends in
    pruning.transformers_class: that one is built, resized per layer like any checkpoint."""
    names = getattr(config, "architectures", None) or []
    base = (getattr(config, "pruning", None) or {}).get("transformers_class")
    if names and base and not hasattr(transformers, names[0]):
        names = [base]
    cls = getattr(transformers, names[0], None) if names else None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise CheckpointError(
            f"{where}: config.architectures {names} names no transformers model class"
        )
    return cls


def build_on_meta(
    config,
    *,
    cls: type[PreTrainedModel] | None = None,
    layouts: list[LayerLayout] | None = None,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """The architecture with per-layer shapes `layouts`, its parameters on the meta device.

    Why one helper: loading a pruned checkpoint, the memory model, the report's layer picture and
    the LM-head reader all need the same steps (class, empty build, per-layer resize) and must
    agree on the shapes. `config` is copied, never edited; a layout list also sets the layer count.
    """
    config = copy.deepcopy(config)  # from_config shares the config object with the model
    if layouts is not None and config.num_hidden_layers != len(layouts):
        config.num_hidden_layers = len(layouts)
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [config.layer_types[0]] * len(layouts)
    cls = cls or model_class(config)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, **kwargs)
    if layouts is not None:
        get_adapter(model).resize_to_layout(model, layouts)
    return model


def _assign_weights(model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    for target, source in tied_pairs(model).items():
        if target not in state and source in state:
            state[target] = state[source]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise CheckpointError(
            f"{directory}: weights do not match the saved layout ({' '.join(first[:3])})"
        ) from err


def saved_layouts(config) -> list[LayerLayout] | None:
    """The per-layer layout a checkpoint's config.json records (None for a plain HF config)."""
    pruning = getattr(config, "pruning", None)
    return [LayerLayout(**entry) for entry in pruning["layout"]] if pruning else None


def load_pruned(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = True,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load a checkpoint of ANY per-layer layout, ready for inference (eval mode)."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory")
    if verify:
        verify_manifest(directory)
    try:
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{directory}: unreadable config.json ({err})") from err
    model = build_on_meta(
        config,
        cls=model_class(config, directory),
        layouts=saved_layouts(config),
        attn_implementation=attn_implementation,
    )
    state = _read_state(directory)
    if getattr(model, "pooler", None) is not None and not any(
        k.startswith("pooler.") for k in state
    ):
        model.pooler = None  # an encoder exported without its (unused) pooler, e.g. for embeddings
    _assign_weights(model, state, directory)
    model.tie_weights()
    on_meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if on_meta:
        raise CheckpointError(f"{directory}: parameters left without weights: {on_meta[:5]}")
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()


def load_tokenizer(path: str | Path):
    """The tokenizer saved next to the weights (local files only, no remote code)."""
    directory = Path(path)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        # AutoTokenizer would otherwise build an empty tokenizer from config.model_type alone
        raise CheckpointError(
            f"{directory}: no loadable tokenizer (none of {', '.join(TOKENIZER_FILES)})"
        )
    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{directory}: no loadable tokenizer ({err})") from err
