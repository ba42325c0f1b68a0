"""Which serving engines can load a pruned checkpoint, read from its per-layer layout.

The rules follow what each engine's model code accepts (docs/DEPLOY.md): plain transformers needs
a layout its vanilla config can express; vLLM and TensorRT-LLM take ordinary (uniform) configs,
and per-layer widths only through a DeciLM / Nemotron-NAS model, which takes per-layer KV heads and
FFN widths but one global query-head count; llama.cpp reads per-layer head and FFN arrays through
its `deci` architecture for Llama-family models (`cascade export --format gguf`).
"""

from __future__ import annotations

from stages.arch import find_adapter


def engine_support(model_type: str, pruning: dict) -> dict[str, str]:
    """{engine: verdict} for a checkpoint's config.model_type and its "pruning" section.

    Llama-shaped model types (the adapter names a GGUF architecture for them) also map onto
    DeciLM / Nemotron-NAS, which is how per-layer widths reach vLLM, TensorRT-LLM and llama.cpp.
    """
    layouts = pruning.get("layout") or []
    uniform = bool(pruning.get("uniform"))
    vanilla = bool(pruning.get("vanilla_loadable"))
    adapter = find_adapter(model_type)
    llama = adapter is not None and adapter.gguf_architecture(model_type) is not None
    one_query_count = len({x["num_heads"] for x in layouts}) <= 1
    transformers = (
        "yes: AutoModel*.from_pretrained (cascade export --format hf)"
        if vanilla
        else "load_pruned only: per-layer widths the vanilla config cannot express"
    )
    if uniform and vanilla:
        vllm = trt = "yes: an ordinary config (cascade export --format hf)"
    elif llama and one_query_count:
        vllm = trt = "not yet: needs a DeciLM / Nemotron-NAS config export (not built here)"
    else:
        vllm = trt = "no: per-layer query-head counts; use target.layout uniform or keep_attention"
    if not llama:
        gguf = "no: GGUF export covers Llama-family models (Llama, Mistral, Qwen2)"
    elif uniform:
        gguf = "yes: cascade export --format gguf (llama architecture)"
    else:
        gguf = "yes: cascade export --format gguf (deci architecture, per-layer arrays)"
    return {"transformers": transformers, "vllm": vllm, "tensorrt_llm": trt, "llama.cpp": gguf}
