"""`--format hf --remote-code`: any per-layer layout as a folder every Hugging Face tool loads.

Plain transformers configs hold one head count and one FFN width for all layers, so a per-layer
pruned model cannot be a vanilla folder (runner/exporters/hf.py refuses it). This export ships a
small modeling file of ours (runner/exporters/modeling_cascade.py, copied unchanged) and maps
config.json's `auto_map` AutoConfig / AutoModelForCausalLM to it, as DeciLM / Nemotron-NAS
checkpoints do; `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`, pipelines,
lm-eval and peft then load it. The config keeps the family's model_type and dense-width fields and
adds `per_layer` (what the modeling file reads) and the `pruning` record with `transformers_class`,
so stages.checkpoint.load_pruned loads the same folder with plain transformers classes and never
runs the shipped file. Llama-family causal LMs only (llama, mistral, qwen2).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from runner.exporters import Checkpoint, ExportError
from runner.exporters import modeling_cascade as modeling
from runner.exporters.hf import HFExporter, with_dtype, write_folder
from stages.arch import find_adapter

MODELING_FILE = Path(modeling.__file__)
MODULE = MODELING_FILE.stem  # auto_map entries are "<module>.<class>" within the folder


def remote_config(ckpt: Checkpoint) -> dict:
    """config.json of the export: auto_map to our classes, per_layer, the pruning record."""
    classes = modeling.CLASSES.get(ckpt.model_type)
    if classes is None or not ckpt.architecture.endswith("ForCausalLM"):
        raise ExportError(
            f"{ckpt.path}: --remote-code covers causal LMs of the llama family "
            f"({', '.join(sorted(modeling.CLASSES))}), not {ckpt.model_type} "
            f"{ckpt.architecture}; export --format gguf or load it with "
            "stages.checkpoint.load_pruned"
        )
    config_cls, model_cls = classes
    config = dict(ckpt.config)
    config["architectures"] = [model_cls.__name__]
    config["auto_map"] = {
        "AutoConfig": f"{MODULE}.{config_cls.__name__}",
        "AutoModelForCausalLM": f"{MODULE}.{model_cls.__name__}",
    }
    config["per_layer"] = [
        {key: int(entry[key]) for key in modeling.PER_LAYER_KEYS} for entry in ckpt.layouts
    ]
    # a plain HF folder (no pruning record) gets one, so load_pruned reads this export too
    pruning = dict(ckpt.config.get("pruning") or {"layout": config["per_layer"]})
    pruning.setdefault("family", find_adapter(ckpt.model_type).family)
    pruning.setdefault("uniform", ckpt.uniform)
    pruning.setdefault("vanilla_loadable", ckpt.vanilla_loadable)
    pruning["transformers_class"] = ckpt.architecture
    config["pruning"] = pruning
    return config


class HFRemoteCodeExporter(HFExporter):
    name = "hf"

    def export(
        self, ckpt: Checkpoint, out: Path, *, dtype: str | None, log: Callable[[str], None]
    ) -> Path:
        if out.exists() and not out.is_dir():
            raise ExportError(f"{out}: exists and is not a directory; choose another -o")
        if out.resolve() == ckpt.path.resolve():
            raise ExportError(f"{out}: is the checkpoint itself; choose another -o")
        config = with_dtype(remote_config(ckpt), dtype)
        write_folder(ckpt, out, config, dtype, extra=(MODELING_FILE,))
        plain = (
            " (plain --format hf would load without remote code)" if ckpt.vanilla_loadable else ""
        )
        log(
            f"[cascade] export: hf folder {out} with {MODELING_FILE.name} "
            f"(load with trust_remote_code=True; {dtype or 'source dtype'}){plain}"
        )
        return out
