"""GGUF files (llama.cpp) -> Hugging Face config dict + HF-named float32 tensors.

    hf_config, tensors = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")

Dequantisation and renaming are transformers' own (``load_gguf_checkpoint``), so the result is
exactly what ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` loads: in particular the
Meta RoPE permutation llama.cpp applies to q/k projections is undone there. Needs ``torch``,
``gguf`` and ``transformers``; only a meta-device (storage-free) torch model is built, to get the
GGUF -> HF tensor-name map. Tied models have no ``lm_head.weight`` (``tie_word_embeddings``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def read_gguf(file: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(hf_config_dict, {hf_name: float32 array})`` for a GGUF checkpoint."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: GGUF file not found")
    try:
        import torch
        import transformers
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as e:
        raise ImportError(f"{file}: reading GGUF needs torch, gguf and transformers ({e})") from e

    try:
        hf_config = dict(load_gguf_checkpoint(str(file), return_tensors=False)["config"])
    except (ValueError, NotImplementedError) as e:
        raise ValueError(f"{file}: transformers cannot read this GGUF file: {e}") from e
    hf_config.pop("_model_name_or_path", None)
    config = transformers.AutoConfig.for_model(**hf_config)
    with torch.device("meta"):
        names_model = transformers.AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(str(file), return_tensors=True, model_to_load=names_model,
                                  torch_dtype=torch.float32)
    tensors = {name: t.detach().cpu().to(torch.float32).numpy() for name, t in parsed["tensors"].items()}
    hf_config.setdefault("architectures", list(getattr(config, "architectures", None) or []) or
                         [type(names_model).__name__])
    return hf_config, tensors


__all__ = ["read_gguf"]
