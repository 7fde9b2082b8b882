"""`crosslmm import-llava-ov`: start from a LLaVA-OneVision checkpoint a user already has.

The imported model, in the `llava-ov` compatibility layout (pool after the projector to
14x14, one newline token per video, DCAL off), computes exactly what transformers'
`LlavaOnevisionForConditionalGeneration` computes on the same frames and prompt. Its
vision tower, projector and LLM are then the natural initialisation of CrossLMM stage 1:
`config.to_crosslmm(9)` switches to 9 tokens per frame with DCAL on (closed cross-attention blocks).

Images: LLaVA-OneVision's any-resolution image path (tiles plus per-row newlines) is not
reproduced; CrossLMM treats an image as a 1-frame video.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import LlavaOnevisionForConditionalGeneration

from crosslmm.checkpoints.assemble import CheckpointError, assemble, read_config_json
from crosslmm.model.configuration import CrossLMMConfig

# In-memory LlavaOnevisionForConditionalGeneration names -> CrossLMM names.
KEY_PREFIXES = (
    ("model.vision_tower.", "vision_tower.vit."),
    ("model.multi_modal_projector.", "projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.image_newline", "media_newline"),
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja")
# transformers' own processor files are not copied: their `processor_config.json` is a
# different file from ours (same name), and the frame processing they describe is
# rewritten below as our preprocessor_config.json.


def crosslmm_config_from_llava_ov(source_config) -> CrossLMMConfig:
    """The `llava-ov` compatibility config of a LlavaOnevisionConfig, or a clear refusal."""
    layer = source_config.vision_feature_layer
    if not isinstance(layer, int):
        raise CheckpointError(f"vision_feature_layer={layer!r}: only a single feature layer can be imported")
    vision_type = source_config.vision_config.model_type
    if source_config.vision_feature_select_strategy == "default" and vision_type != "clip_vision_model":
        raise CheckpointError(f"vision_feature_select_strategy='default' with {vision_type} is not supported")
    if not getattr(source_config, "multimodal_projector_bias", True):
        raise CheckpointError("multimodal_projector_bias=False is not supported (the CrossLMM projector has biases)")
    base = CrossLMMConfig(
        source_config.vision_config,
        source_config.text_config,
        media_token_id=source_config.video_token_id,
        vision_feature_layer=layer,
        projector_hidden_act=source_config.projector_hidden_act,
    )
    return base.to_llava_ov_compatible()


def convert_state(source_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = {}
    for key, value in source_state.items():
        for old, new in KEY_PREFIXES:
            if key.startswith(old):
                converted[new + key[len(old):]] = value
                break
        else:
            raise CheckpointError(f"unexpected tensor {key!r} in the LLaVA-OneVision checkpoint")
    return converted


def import_llava_onevision(
    source_dir: str | Path, out_dir: str | Path, layout: str = "llava-ov", tokens_per_frame: int = 9,
    dtype: torch.dtype | None = None,
) -> Path:
    """Convert and save. `layout="crosslmm"` writes the paper's layout instead (pool
    before the projector, `tokens_per_frame`, DCAL on with closed blocks, no newline)."""
    model_type = read_config_json(source_dir).get("model_type")
    if model_type != "llava_onevision":
        raise CheckpointError(f"{Path(source_dir) / 'config.json'} has model_type={model_type!r}, expected 'llava_onevision'")
    source = LlavaOnevisionForConditionalGeneration.from_pretrained(source_dir, local_files_only=True, dtype=dtype)
    config = crosslmm_config_from_llava_ov(source.config)
    if layout == "crosslmm":
        config = config.to_crosslmm(tokens_per_frame)
    elif layout != "llava-ov":
        raise ValueError(f"layout must be 'llava-ov' or 'crosslmm', got {layout!r}")
    state = convert_state(source.state_dict())
    if not config.media_newline:
        state.pop("media_newline")
    model = assemble(config, state, dtype)

    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copyfile(Path(source_dir) / name, out_dir / name)
    image_processor = _image_processor_dict(Path(source_dir))
    if image_processor is not None:
        (out_dir / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2) + "\n")
    if (out_dir / "tokenizer_config.json").is_file() or (out_dir / "tokenizer.json").is_file():
        from crosslmm.data.processor import CrossLMMProcessor

        # Our processor_config.json; loading also checks the tokenizer keeps the media token.
        CrossLMMProcessor.from_pretrained(out_dir, config=model.config).save_pretrained(out_dir)
    return out_dir


def _image_processor_dict(source_dir: Path) -> dict | None:
    """The checkpoint's image processor settings: its preprocessor_config.json (older
    saves), or the `image_processor` entry of the unified processor_config.json that
    transformers 5 writes."""
    legacy = source_dir / "preprocessor_config.json"
    if legacy.is_file():
        return json.loads(legacy.read_text())
    unified = source_dir / "processor_config.json"
    if unified.is_file():
        entry = json.loads(unified.read_text()).get("image_processor")
        if isinstance(entry, dict):
            return entry
    return None
