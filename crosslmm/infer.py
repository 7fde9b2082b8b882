"""Ask a CrossLMM about videos and images: the one place that turns a question and media
files into an answer, shared by the CLI (and, later, the server)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from crosslmm.data.processor import CrossLMMProcessor
from crosslmm.model.modeling import CrossLMMForCausalLM

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default_model"


def default_model_dir() -> Path:
    """The bundled model: a small CrossLMM trained from scratch on the synthetic world
    (docs/synthetic.md), so that `crosslmm ask` and `crosslmm demo` work offline on a
    fresh install. It knows only that world: 64 px scenes of coloured sprites."""
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise FileNotFoundError(2, "the bundled default model is missing from this install; pass --model", str(DEFAULT_MODEL))
    return DEFAULT_MODEL


def load(model_dir: str | Path, device: str = "cpu", **processor_options: Any) -> tuple[CrossLMMForCausalLM, CrossLMMProcessor]:
    """Model and processor from one local checkpoint directory (they must agree: the
    processor reads tokens per frame and the placeholder id from the model's config)."""
    # CPU inference runs in float32 (bf16 matmuls are slow there); the bundled model is
    # stored in bf16 to stay small. On GPU the checkpoint's own dtype is kept.
    dtype = torch.float32 if torch.device(device).type == "cpu" else "auto"
    model = CrossLMMForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype).to(device).eval()
    processor = CrossLMMProcessor.from_pretrained(model_dir, config=model.config, **processor_options)
    return model, processor


@torch.inference_mode()
def encode_clip(model: CrossLMMForCausalLM, processor: CrossLMMProcessor, clip: Any) -> torch.Tensor:
    """(F, N, Dv) vision features of one decoded clip: what callers that ask one video
    many questions keep (chat, evaluation, the server) and pass as `vision_features`."""
    device = next(model.parameters()).device
    return model.vision_tower(processor.frame_processor(clip).to(device))


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a batch of token lists, left-padded: every row's
    last position is its newest token, as `generate` wants."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


@torch.inference_mode()
def generate_answer(
    model: CrossLMMForCausalLM,
    processor: CrossLMMProcessor,
    question: str,
    media: Sequence[Any] = (),
    **generation: Any,
) -> tuple[str, dict[str, Any], torch.Tensor]:
    """The answer text, the model inputs of the prompt and the generated token ids (n,):
    for callers that need more than the text (the demo's attention pass). `media` are
    paths or already decoded clips/images; the question may place them with
    `<video>`/`<image>`, otherwise they come first."""
    if media and not any(tag in question for tag in ("<video>", "<image>", "<media>")):
        question = "".join("<video>\n" for _ in media) + question
    inputs = processor([{"role": "user", "content": question}], media=list(media))
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    generation.setdefault("max_new_tokens", 64)
    output = model.generate(**inputs, **generation)
    generated = output[0, inputs["input_ids"].shape[1]:]
    return processor.tokenizer.decode(generated, skip_special_tokens=True).strip(), inputs, generated


def answer(
    model: CrossLMMForCausalLM,
    processor: CrossLMMProcessor,
    question: str,
    media: Sequence[str | os.PathLike] = (),
    **generation: Any,
) -> str:
    """The model's answer to `question` about `media` (videos or images, in order)."""
    return generate_answer(model, processor, question, media, **generation)[0]
