"""`--format hf`: a folder that plain transformers loads with AutoModelFor*.from_pretrained.

Only a layout the architecture's own config can express qualifies (every layer the same shape,
and pruned heads expressible: Llama-style configs carry head_dim, GPT-2/BERT derive it from
hidden/heads). Anything else is refused in one line that names which layers differ and which
job setting would have produced an exportable model; such checkpoints load with
stages.checkpoint.load_pruned, or go to llama.cpp through `--format gguf`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

from runner.exporters import (
    UNIFORM_HINT,
    Checkpoint,
    Exporter,
    ExportError,
    describe_layout,
    torch_dtype,
)
from stages.checkpoint import checkpoint_directory

CONFIG_DTYPE = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}
# what the output gets besides weights and config: everything else the checkpoint carries
# (tokenizer files, chat template, generation config), except these cascade-only files
SKIP = {"config.json", "manifest.json", "model.safetensors.index.json"}
# weights are rewritten, and code is never carried over from a checkpoint folder (the remote-code
# export ships its own modeling file, passed as `extra`)
SKIP_SUFFIXES = {".safetensors", ".py"}


def refusal(ckpt: Checkpoint) -> str | None:
    """Why plain transformers cannot load this layout (None when it can)."""
    if ckpt.vanilla_loadable:
        return None
    shape = describe_layout(ckpt.layouts)
    heads = {(entry["num_heads"], entry["num_kv_heads"]) for entry in ckpt.layouts}
    if ckpt.uniform or (len(heads) > 1 and not _config_has_head_dim(ckpt.model_type)):
        why = f"a {ckpt.model_type} config cannot express pruned attention heads"
        hint = f"keep_attention: true + {UNIFORM_HINT}"
    else:
        why = "a transformers config holds one head count and one FFN width for all layers"
        hint = UNIFORM_HINT
    return (
        f"{ckpt.path}: cannot export as plain hf: {shape} ({why}); a job with {hint} would have "
        "avoided it - export --format gguf for llama.cpp, or load it with "
        "stages.checkpoint.load_pruned"
    )


def _config_has_head_dim(model_type: str) -> bool:
    """Whether this architecture's config can state head_dim (so fewer heads stay expressible)."""

    try:
        return "head_dim" in AutoConfig.for_model(model_type).to_dict()
    except (ValueError, KeyError):
        return False


class HFExporter(Exporter):
    name = "hf"
    default_dtype = None  # keep the checkpoint's dtype unless --dtype asks for another

    def default_output(self, checkpoint: Path, dtype: str | None) -> Path:
        return checkpoint.with_name(f"{checkpoint.name}-hf")

    def export(
        self, ckpt: Checkpoint, out: Path, *, dtype: str | None, log: Callable[[str], None]
    ) -> Path:

        reason = refusal(ckpt)
        if reason:
            raise ExportError(reason)
        if out.exists() and not out.is_dir():
            raise ExportError(f"{out}: exists and is not a directory; choose another -o")
        if out.resolve() == ckpt.path.resolve():
            raise ExportError(f"{out}: is the checkpoint itself; choose another -o")
        # no remote code: neither the pruning record nor an auto_map to a .py (none is copied)
        config = {k: v for k, v in ckpt.config.items() if k not in ("pruning", "auto_map")}
        write_folder(ckpt, out, with_dtype(config, dtype), dtype)
        log(f"[cascade] export: hf folder {out} ({dtype or 'source dtype'})")
        return out


def with_dtype(config: dict, dtype: str | None) -> dict:
    """The exported config.json's dtype field: `dtype` when one is asked for, else the source's."""
    if dtype is not None:
        config["dtype"] = CONFIG_DTYPE[dtype]
        config.pop("torch_dtype", None)
    return config


def write_folder(
    ckpt: Checkpoint, out: Path, config: dict, dtype: str | None, extra: tuple[Path, ...] = ()
) -> None:
    """Weights (cast to `dtype`), `config`, the checkpoint's other files and `extra` files, written
    atomically with a manifest (shared by the plain and the remote-code hf exports)."""
    with checkpoint_directory(out) as tmp:
        total = _write_weights(ckpt, tmp, dtype)
        if len(set(ckpt.weight_files.values())) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": ckpt.weight_files}
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2, sort_keys=True)
            )
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for path in sorted(ckpt.path.iterdir()):
            if path.is_file() and path.name not in SKIP and path.suffix not in SKIP_SUFFIXES:
                shutil.copy2(path, tmp / path.name)
        for path in extra:
            shutil.copy2(path, tmp / path.name)


def _write_weights(ckpt: Checkpoint, directory: Path, dtype: str | None) -> int:
    """Rewrite each weight file under the same name, floats cast to `dtype`; total bytes."""

    target = torch_dtype(dtype) if dtype is not None else None
    total = 0
    for filename in sorted(set(ckpt.weight_files.values())):
        with safe_open(str(ckpt.path / filename), framework="pt", device="cpu") as handle:
            shard = {}
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = handle.get_tensor(name)
                if target is not None and tensor.is_floating_point():
                    tensor = tensor.to(target)
                shard[name] = tensor.contiguous()
                total += tensor.numel() * tensor.element_size()
        save_file(shard, str(directory / filename), metadata={"format": "pt"})
    return total
