"""`crosslmm build`: an untrained CrossLMM from a local vision encoder and a local LLM.

This is how users get CrossLMM weights at all: nobody publishes them, so a model is
assembled from a pretrained SigLIP / SigLIP2 / CLIP vision checkpoint and a pretrained
Llama-family LLM with its tokenizer, then trained (stage 1: projector + V2V).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel, Siglip2VisionModel, SiglipVisionModel

from crosslmm.checkpoints.assemble import CheckpointError, assemble, read_config_json
from crosslmm.model.configuration import CrossLMMConfig
from crosslmm.model.modeling import parameter_part

MEDIA_TOKEN = "<media>"
# config.json model_type -> the vision-only class; full dual-encoder checkpoints
# (siglip, clip) load their vision half through the same class.
VISION_CLASSES = {
    "siglip": SiglipVisionModel,
    "siglip_vision_model": SiglipVisionModel,
    "siglip2": Siglip2VisionModel,
    "siglip2_vision_model": Siglip2VisionModel,
    "clip": CLIPVisionModel,
    "clip_vision_model": CLIPVisionModel,
}
SUPPORTED_LLMS = ("qwen2", "qwen3", "llama", "mistral")


def _model_type(directory: str | Path, supported, what: str) -> str:
    """The checkpoint's model_type from its config.json, refused unless supported."""
    model_type = read_config_json(directory).get("model_type")
    if model_type not in supported:
        raise CheckpointError(
            f"{Path(directory) / 'config.json'} has model_type={model_type!r}; supported {what}: {sorted(supported)}"
        )
    return model_type


def load_vision(directory: str | Path, dtype: torch.dtype | None = None):
    model_type = _model_type(directory, VISION_CLASSES, "vision encoders")
    return VISION_CLASSES[model_type].from_pretrained(directory, local_files_only=True, dtype=dtype)


def load_llm(directory: str | Path, dtype: torch.dtype | None = None):
    _model_type(directory, SUPPORTED_LLMS, "LLMs (Llama-family decoders DCAL can wrap)")
    llm = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{directory} has no loadable tokenizer (tokenizer.json / tokenizer_config.json): {err}") from err
    return llm, tokenizer


def build(
    vision_dir: str | Path, llm_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None, **options: Any
) -> Path:
    """Assemble, save and return `out_dir`: weights (safetensors), config, tokenizer with
    the media placeholder token, and the vision encoder's preprocessor config."""
    vision = load_vision(vision_dir, dtype)
    llm, tokenizer = load_llm(llm_dir, dtype)

    if MEDIA_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [MEDIA_TOKEN]})
    media_token_id = tokenizer.convert_tokens_to_ids(MEDIA_TOKEN)
    if len(tokenizer) > llm.get_input_embeddings().weight.shape[0]:
        # New rows start at the mean embedding; the placeholder's own row is never read
        # (its position is replaced by visual tokens), the resize only keeps ids in range.
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)

    text_config = llm.config
    eos = getattr(llm.generation_config, "eos_token_id", None)
    if eos is not None:
        text_config.eos_token_id = eos  # chat models stop at end-of-turn, which generation_config names
    if text_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        text_config.pad_token_id = tokenizer.pad_token_id

    config = CrossLMMConfig(vision.config, text_config, media_token_id=media_token_id, **options)
    state = {f"vision_tower.vit.{k}": v for k, v in vision.state_dict().items()}
    state.update({f"language_model.{k}": v for k, v in llm.state_dict().items()})
    model = assemble(config, state, dtype)
    _check_loaded(model, state)

    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    preprocessor = Path(vision_dir) / "preprocessor_config.json"
    if preprocessor.is_file():
        shutil.copyfile(preprocessor, out_dir / "preprocessor_config.json")
    return out_dir


def _check_loaded(model, state: dict[str, torch.Tensor]) -> None:
    """Every pretrained tensor the model has (vision tower, LLM) must have come from the checkpoints."""
    own = set(model.state_dict())
    missing = sorted(k for k in own if k not in state and parameter_part(k) in ("vision", "llm"))
    if missing:
        raise CheckpointError("these weights were not found in the checkpoints: " + ", ".join(missing[:10]))
