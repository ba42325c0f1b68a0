"""Exporters: turn a pruned checkpoint into what an inference engine loads.

A registry of formats (name -> exporter class, imported only when asked for, so `cascade --help`
does not pay for torch or gguf) and what every exporter shares: reading a checkpoint (verified
against its manifest first), its per-layer layout, the output dtype, describing a non-uniform
layout in one line, and writing a single output file atomically.

    from runner.exporters import export_checkpoint
    export_checkpoint("runs/x/checkpoint", "gguf", dtype="f16")   # -> runs/x/checkpoint-f16.gguf
"""

from __future__ import annotations

import importlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from stages.checkpoint import INDEX, SINGLE, CheckpointError, verify_manifest

# name -> "module:Class"; a new format is one line here and one module beside this file
EXPORTERS: dict[str, str] = {
    "hf": "runner.exporters.hf:HFExporter",
    "gguf": "runner.exporters.gguf:GGUFExporter",
}
EXPORT_FORMATS: tuple[str, ...] = tuple(EXPORTERS)
# `--format hf --remote-code`: any per-layer layout, with a modeling file shipped in the folder
REMOTE_CODE_EXPORTER = "runner.exporters.hf_remote:HFRemoteCodeExporter"
DTYPES = ("f16", "bf16", "f32")
# the job setting that keeps every layer the same shape (named in refusals of per-layer layouts)
UNIFORM_HINT = "target.layout: uniform"


class ExportError(ValueError):
    """A checkpoint cannot be exported in the asked format (message: cause, path, what to do)."""


@dataclass
class Checkpoint:
    """What an exporter reads from a checkpoint directory (weights stay on disk until asked)."""

    path: Path
    config: dict
    layouts: list[dict]  # per layer: num_heads, num_kv_heads, intermediate_size
    uniform: bool
    vanilla_loadable: bool
    weight_files: dict[str, str] = field(default_factory=dict)  # tensor name -> file name

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "?"))

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or ["?"])[0]

    def tensor_order(self) -> list[str]:
        """Tensor names in the order tensors() yields them (file by file)."""
        return sorted(self.weight_files, key=lambda name: self.weight_files[name])

    def tensors(self) -> Iterator[tuple[str, object]]:
        """(name, torch tensor) one at a time: a large model is never all in memory."""

        handle, current = None, None
        try:
            for name in self.tensor_order():
                filename = self.weight_files[name]
                if filename != current:
                    if handle is not None:
                        handle.__exit__(None, None, None)
                    handle = safe_open(str(self.path / filename), framework="pt", device="cpu")
                    handle.__enter__()
                    current = filename
                yield name, handle.get_tensor(name)
        finally:
            if handle is not None:
                handle.__exit__(None, None, None)

    def shapes(self) -> dict[str, tuple[int, ...]]:

        shapes: dict[str, tuple[int, ...]] = {}
        for filename in sorted(set(self.weight_files.values())):
            with safe_open(str(self.path / filename), framework="pt", device="cpu") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        return shapes


class Exporter:
    """One output format. Subclasses set name and implement export()."""

    name: str = ""
    default_dtype: str | None = "f16"  # None: keep the checkpoint's own dtype

    def default_output(self, checkpoint: Path, dtype: str | None) -> Path:
        raise NotImplementedError

    def export(
        self, checkpoint: Checkpoint, out: Path, *, dtype: str | None, log: Callable[[str], None]
    ) -> Path:
        raise NotImplementedError


def get_exporter(name: str, *, remote_code: bool = False, **options) -> Exporter:
    """A fresh exporter for format `name` (one of EXPORT_FORMATS); options go to its __init__.

    remote_code: the hf folder that ships its own modeling file (format hf only)."""
    if name not in EXPORTERS:
        raise ExportError(
            f"unknown export format {name!r}; known formats: {', '.join(EXPORT_FORMATS)}"
        )
    if remote_code and name != "hf":
        raise ExportError(f"--remote-code applies to --format hf only, not {name}")
    module_name, class_name = (REMOTE_CODE_EXPORTER if remote_code else EXPORTERS[name]).split(":")
    return getattr(importlib.import_module(module_name), class_name)(**options)


def _weight_files(path: Path) -> dict[str, str]:

    if (path / INDEX).is_file():
        try:
            return dict(json.loads((path / INDEX).read_text())["weight_map"])
        except (ValueError, KeyError, TypeError) as err:
            raise ExportError(f"{path / INDEX}: unreadable shard index ({err})") from err
    if not (path / SINGLE).is_file():
        raise ExportError(
            f"{path}: no {SINGLE} or {INDEX}; export reads safetensors checkpoints only"
        )

    with safe_open(str(path / SINGLE), framework="pt", device="cpu") as handle:
        return {name: SINGLE for name in handle.keys()}  # noqa: SIM118


def read_checkpoint(path: str | Path, *, verify: bool = True) -> Checkpoint:
    """Open a checkpoint for export; with verify, a file that differs from its manifest is refused.

    A plain HF folder (no "pruning" section) counts as uniform and vanilla-loadable; its layout is
    read from the config fields.
    """

    directory = Path(path)
    if not directory.is_dir():
        raise ExportError(
            f"{directory}: not a checkpoint directory (expected config.json and "
            "model*.safetensors); check the path"
        )
    if verify:
        try:
            verify_manifest(directory)
        except CheckpointError as err:
            raise ExportError(
                f"{err} - refusing to export a checkpoint that does not match its manifest "
                "(re-create it, or pass --no-verify to export it anyway)"
            ) from err
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"{directory / 'config.json'}: unreadable ({err})") from err
    pruning = config.get("pruning") or {}
    layouts = pruning.get("layout") or _layout_from_config(config)
    uniform = all(entry == layouts[0] for entry in layouts) if layouts else True
    return Checkpoint(
        path=directory,
        config=config,
        layouts=[dict(entry) for entry in layouts],
        uniform=uniform,
        vanilla_loadable=bool(pruning.get("vanilla_loadable", True)),
        weight_files=_weight_files(directory),
    )


def _layout_from_config(config: dict) -> list[dict]:
    heads = config.get("num_attention_heads") or config.get("n_head")
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    if not heads or not layers:
        return []
    entry = {
        "num_heads": int(heads),
        "num_kv_heads": int(config.get("num_key_value_heads") or heads),
        "intermediate_size": int(config.get("intermediate_size") or config.get("n_inner") or 0),
    }
    return [dict(entry) for _ in range(int(layers))]


def _ranges(indices: list[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2,5,7-8'."""
    parts: list[str] = []
    start = prev = indices[0]
    for i in indices[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def describe_layout(layouts: list[dict]) -> str:
    """One line: which layers have which head / KV-head counts, and the FFN widths."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, entry in enumerate(layouts):
        groups.setdefault((entry["num_heads"], entry["num_kv_heads"]), []).append(i)
    attention = []
    for n, ((heads, kv), layers) in enumerate(groups.items()):
        shape = f"{heads} heads / {kv} KV heads" if n == 0 else f"{heads} / {kv}"
        attention.append(f"layer{'s' if len(layers) > 1 else ''} {_ranges(layers)} have {shape}")
    widths = [entry["intermediate_size"] for entry in layouts]
    ffn = (
        f"FFN widths {min(widths)}..{max(widths)}"
        if min(widths) != max(widths)
        else f"FFN width {widths[0]} in every layer"
    )
    return f"{', '.join(attention)}; {ffn}"


def torch_dtype(dtype: str):

    return {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[dtype]


def check_output_parent(out: Path) -> None:
    """Refuse an output whose directory is missing or not writable, before any work is done."""
    parent = out.parent
    if not parent.is_dir():
        raise ExportError(f"{out}: directory {parent} does not exist; create it or choose -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"{out}: directory {parent} is not writable; choose another -o")


def check_target(source: Path, target: Path, fmt: str, *, force: bool) -> None:
    """Refuse a target that would destroy something: the checkpoint itself, a directory holding
    it (e.g. its run directory) or inside it, and any existing path unless --force names an
    earlier export of the same format (an HF folder; a GGUF file)."""
    src, tgt = source.resolve(), target.resolve()
    if tgt == src:
        raise ExportError(f"{target}: is the checkpoint itself; choose another -o")
    if src in tgt.parents:
        raise ExportError(f"{target}: is inside the checkpoint {source}; choose an -o outside it")
    if tgt in src.parents:
        raise ExportError(
            f"{target}: contains the checkpoint {source} (exporting there would delete it); "
            "choose another -o"
        )
    if not (target.exists() or target.is_symlink()):
        return
    if not force:
        raise ExportError(
            f"{target}: already exists; pass --force to replace it or choose another -o"
        )
    if not _earlier_export(target, fmt):
        what = "an HF folder (config.json, no subfolders)" if fmt == "hf" else "a GGUF file"
        raise ExportError(
            f"--force: {target} is not an earlier {fmt} export ({what}); refusing to replace it"
        )


def _earlier_export(target: Path, fmt: str) -> bool:
    if target.is_symlink():
        return False
    if fmt == "hf":
        return (
            target.is_dir()
            and (target / "config.json").is_file()
            and not any(p.is_dir() for p in target.iterdir())
        )
    if not target.is_file():
        return False
    with open(target, "rb") as handle:
        return handle.read(4) == b"GGUF"


@contextmanager
def atomic_file(out: Path) -> Iterator[Path]:
    """A temp path beside `out` to write; fsynced and renamed over `out` only on success."""
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def export_checkpoint(
    checkpoint: str | Path,
    fmt: str | Exporter,
    out: str | Path | None = None,
    *,
    dtype: str | None = None,
    verify: bool = True,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Export `checkpoint` as `fmt` to `out` (default: beside the checkpoint); returns the path.

    fmt: a format name or a configured exporter (e.g. GGUFExporter(tokenizer_pre="llama-bpe")).
    An existing `out` is replaced only with force, and only when it is an earlier export.
    """
    exporter = get_exporter(fmt) if isinstance(fmt, str) else fmt
    dtype = dtype or exporter.default_dtype
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    source = Path(checkpoint)
    if not verify:
        log(f"[cascade] export: --no-verify: {source} is NOT checked against its manifest")
    ckpt = read_checkpoint(source, verify=verify)
    target = Path(out) if out is not None else exporter.default_output(source, dtype)
    if "\0" in str(target):  # the OS calls raise ValueError("embedded null byte") for it
        raise ExportError(f"-o {str(target)[:80]!r}: contains a NUL byte; choose another -o")
    target = Path(os.path.abspath(target))  # `-o .` names the current directory, not ''
    check_output_parent(target)
    check_target(source, target, exporter.name, force=force)
    try:
        return exporter.export(ckpt, target, dtype=dtype, log=log)
    except OSError as err:  # disk full, permissions changed underway: name the output
        raise ExportError(f"{target}: cannot write ({err.strerror or err})") from err
