"""`--format gguf`: one .gguf file for llama.cpp, for Llama-family causal LMs (llama, mistral, qwen2).

Architecture written:
* uniform layout -> `llama` (Llama, Mistral) or `qwen2`, scalar head counts and FFN length, as
  llama.cpp's own converter writes them, so transformers can also reload it (gguf_file=...);
* per-layer layout -> `deci` (DeciLM / Nemotron-NAS in llama.cpp): `feed_forward_length`,
  `attention.head_count` and `attention.head_count_kv` as per-layer arrays. llama.cpp's `llama`
  architecture builds every layer from layer 0's values, so a per-layer file under that name
  would not load right; `deci` reads each layer's own values and uses the same tensor names.

`attention.key_length` / `value_length` / `rope.dimension_count` are always written: after head
pruning hidden / heads is no longer the head size, and llama.cpp would derive it that way.

RoPE: transformers rotates the two halves of each head (rotate_half), llama.cpp's `llama`/`deci`
rotate adjacent pairs, so q/k rows are permuted within each head (the same permutation
llama.cpp's converter applies and transformers' GGUF loader undoes). It acts inside one head's
block of rows, so each layer is permuted with its own head count. `qwen2` uses llama.cpp's NEOX
rope (halves), so its rows stay as they are.

Tensors: 1-D (norms, biases) are stored as F32 as llama.cpp's converter does, the rest in --dtype.
Written one tensor at a time into a temp file beside the output, then renamed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch

from runner.exporters import Checkpoint, Exporter, ExportError, atomic_file
from runner.exporters.gguf_vocab import VocabError, add_vocab
from stages.arch import ArchAdapter, find_adapter, model_types_where

FILE_TYPE = {"f32": 0, "f16": 1, "bf16": 32}  # gguf.LlamaFileType ALL_F32 / MOSTLY_F16 / _BF16
# llama.cpp architectures that rotate adjacent pairs (q/k rows permuted); qwen2 rotates halves
PAIRWISE_ROPE = ("llama", "deci")


def _gguf_adapter(ckpt: Checkpoint) -> ArchAdapter | None:
    """The checkpoint's adapter, where it names a llama.cpp architecture for the model type."""
    adapter = find_adapter(ckpt.model_type)
    return adapter if adapter and adapter.gguf_architecture(ckpt.model_type) else None


def gguf_architecture(ckpt: Checkpoint) -> str:
    """`deci` for a per-layer layout, else the adapter's llama.cpp name for the model type."""
    if not ckpt.uniform:
        return "deci"
    return _gguf_adapter(ckpt).gguf_architecture(ckpt.model_type)


def permute_rows(tensor, n_head: int):
    """HF half-split rope rows -> llama.cpp interleaved pairs, within each of n_head heads."""
    rows = tensor.shape[0]
    return (
        tensor.reshape(n_head, 2, rows // n_head // 2, *tensor.shape[1:])
        .transpose(1, 2)
        .reshape(tensor.shape)
    )


def _check_supported(ckpt: Checkpoint) -> None:
    if _gguf_adapter(ckpt) is None:
        supported = model_types_where(lambda adapter, t: adapter.gguf_architecture(t))
        raise ExportError(
            f"{ckpt.path}: gguf export supports Llama-family causal LMs ({', '.join(supported)}); "
            f"this checkpoint is {ckpt.model_type!r} - export it with --format hf instead"
        )
    if not ckpt.architecture.endswith("ForCausalLM"):
        raise ExportError(
            f"{ckpt.path}: gguf export needs a causal LM (...ForCausalLM) for llama.cpp; this "
            f"checkpoint is {ckpt.architecture} - export it with --format hf instead"
        )
    if any(entry["num_heads"] < 1 or entry["intermediate_size"] < 1 for entry in ckpt.layouts):
        raise ExportError(
            f"{ckpt.path}: a layer without attention heads or FFN channels; remove such layers "
            "(layer pruning) before exporting"
        )


def _rope(config: dict) -> tuple[float, str, dict]:
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = str(params.get("rope_type", params.get("type", "default")))
    return theta, kind, params


def _llama3_rope_factors(params: dict, theta: float, head_dim: int):
    """Per-frequency factors of Llama 3.x rope scaling (llama.cpp's rope_freqs tensor)."""

    factor = float(params.get("factor", 8.0))
    low, high = (
        float(params.get("low_freq_factor", 1.0)),
        float(params.get("high_freq_factor", 4.0)),
    )
    old_context = float(params.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            out.append(1.0)
        elif wavelen > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _as_numpy(tensor, dtype: str):
    """One tensor as written: 1-D stays F32, the rest in `dtype` (bf16 as its raw bytes)."""

    if tensor.dim() <= 1 or dtype == "f32":
        return tensor.to(torch.float32).contiguous().numpy()
    if dtype == "f16":
        return tensor.to(torch.float16).contiguous().numpy()
    return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view("uint8")


class GGUFExporter(Exporter):
    name = "gguf"
    default_dtype = "f16"

    def __init__(self, tokenizer_pre: str | None = None) -> None:
        self.tokenizer_pre = tokenizer_pre

    def default_output(self, checkpoint: Path, dtype: str | None) -> Path:
        return checkpoint.with_name(f"{checkpoint.name}-{dtype}.gguf")

    def export(
        self, ckpt: Checkpoint, out: Path, *, dtype: str | None, log: Callable[[str], None]
    ) -> Path:

        dtype = dtype or self.default_dtype
        _check_supported(ckpt)
        if out.is_dir():
            raise ExportError(f"{out}: is a directory; -o must name the .gguf file to write")
        config, layouts = ckpt.config, ckpt.layouts
        arch = gguf_architecture(ckpt)
        names = self._tensor_names(ckpt, arch)
        shapes = ckpt.shapes()
        head_dim = shapes["model.layers.0.self_attn.q_proj.weight"][0] // layouts[0]["num_heads"]
        vocab_size, hidden = shapes["model.embed_tokens.weight"]
        theta, rope_kind, rope_params = _rope(config)
        extra = {}
        if rope_kind == "llama3":
            extra["rope_freqs.weight"] = _llama3_rope_factors(rope_params, theta, head_dim)
        elif rope_kind not in ("default", "linear"):
            raise ExportError(
                f"{ckpt.path}: rope_type {rope_kind!r} is not written by this exporter (default, "
                "linear, llama3 are); convert with llama.cpp's convert_hf_to_gguf.py"
            )
        self._warn_sliding_window(ckpt, log)
        with atomic_file(out) as tmp:
            writer = gguf.GGUFWriter(str(tmp), arch=arch)
            try:
                writer.add_name(f"{ckpt.path.name} ({ckpt.model_type}, cascade-runner)")
                writer.add_file_type(FILE_TYPE[dtype])
                writer.add_vocab_size(vocab_size)
                writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
                writer.add_embedding_length(hidden)
                writer.add_block_count(len(layouts))
                heads = [entry["num_heads"] for entry in layouts]
                kv_heads = [entry["num_kv_heads"] for entry in layouts]
                ffn = [entry["intermediate_size"] for entry in layouts]
                per_layer = arch == "deci"
                writer.add_feed_forward_length(ffn if per_layer else ffn[0])
                writer.add_head_count(heads if per_layer else heads[0])
                writer.add_head_count_kv(kv_heads if per_layer else kv_heads[0])
                writer.add_key_length(head_dim)
                writer.add_value_length(head_dim)
                writer.add_rope_dimension_count(head_dim)
                writer.add_rope_freq_base(theta)
                if rope_kind == "linear":
                    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                    writer.add_rope_scaling_factor(float(rope_params.get("factor", 1.0)))
                writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
                try:
                    add_vocab(writer, ckpt.path, vocab_size, self.tokenizer_pre)
                except VocabError as err:
                    raise ExportError(str(err)) from err
                self._write_tensors(writer, ckpt, arch, names, shapes, extra, dtype, tmp)
            finally:
                writer.close()
        kind = "per-layer (deci)" if arch == "deci" else arch
        log(f"[cascade] export: gguf {out} ({kind}, {dtype}, {len(layouts)} layers)")
        return out

    @staticmethod
    def _tensor_names(ckpt: Checkpoint, arch: str) -> dict[str, str]:
        """HF tensor name -> GGUF name; tied lm_head copies dropped; unknown tensors refused."""

        model_arch = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
        name_map = gguf.get_tensor_name_map(model_arch, len(ckpt.layouts))
        tied = bool(ckpt.config.get("tie_word_embeddings", False))
        names = {}
        for hf_name in ckpt.weight_files:
            if hf_name == "lm_head.weight" and tied:
                continue  # llama.cpp falls back to token_embd when output.weight is absent
            gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ExportError(
                    f"{ckpt.path}: tensor {hf_name} has no GGUF name for {arch}; this "
                    "checkpoint is not a plain Llama-family causal LM"
                )
            names[hf_name] = gguf_name
        if not tied and "lm_head.weight" not in names:
            raise ExportError(f"{ckpt.path}: lm_head.weight missing and embeddings are not tied")
        return names

    @staticmethod
    def _write_tensors(writer, ckpt, arch, names, shapes, extra, dtype, tmp: Path) -> None:
        """Declare every tensor, write the header, then stream the data in the same order."""

        order = [name for name in ckpt.tensor_order() if name in names]
        for hf_name in order:
            shape = shapes[hf_name]
            if len(shape) <= 1 or dtype == "f32":
                info = (shape, np.dtype(np.float32), 4, None)
            elif dtype == "f16":
                info = (shape, np.dtype(np.float16), 2, None)
            else:  # bf16 goes in as raw bytes: the byte shape doubles the last dimension
                bf16 = gguf.GGMLQuantizationType.BF16
                info = ((*shape[:-1], shape[-1] * 2), np.dtype(np.uint8), 2, bf16)
            declared, np_dtype, item, raw = info
            writer.add_tensor_info(names[hf_name], declared, np_dtype, math.prod(shape) * item, raw)
        for name, tensor in extra.items():
            writer.add_tensor_info(
                name, tuple(tensor.shape), np.dtype(np.float32), tensor.numel() * 4
            )
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        permute = arch in PAIRWISE_ROPE
        for hf_name, tensor in ckpt.tensors():
            if hf_name not in names:
                continue
            if permute:
                tensor = _rope_permuted(hf_name, tensor, ckpt.layouts)
            writer.write_tensor_data(_as_numpy(tensor, dtype))
        for tensor in extra.values():
            writer.write_tensor_data(tensor.numpy())

    @staticmethod
    def _warn_sliding_window(ckpt: Checkpoint, log: Callable[[str], None]) -> None:
        config = ckpt.config
        window = config.get("sliding_window")
        used = _gguf_adapter(ckpt).uses_sliding_window(config)
        context = int(config.get("max_position_embeddings", 0) or 0)
        if used and window and context and int(window) < context:
            log(
                f"[cascade] export: WARNING {ckpt.path}: sliding_window={window} is not written "
                f"(llama.cpp's {gguf_architecture(ckpt)} attends to the whole context); outputs "
                f"differ from transformers beyond {window} tokens"
            )


def _rope_permuted(name: str, tensor, layouts: list[dict]):
    parts = name.split(".")
    if len(parts) < 5 or parts[1] != "layers":
        return tensor
    layer = layouts[int(parts[2])]
    if parts[4] == "q_proj":
        return permute_rows(tensor, layer["num_heads"])
    if parts[4] == "k_proj":
        return permute_rows(tensor, layer["num_kv_heads"])
    return tensor
