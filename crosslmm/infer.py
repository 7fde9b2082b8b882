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


def load(model_dir: str | Path, device: str = "cpu", **processor_options: Any) -> tuple[CrossLMMForCausalLM, CrossLMMProcessor]:
    """Model and processor from one local checkpoint directory (they must agree: the
    processor reads tokens per frame and the placeholder id from the model's config)."""
    model = CrossLMMForCausalLM.from_pretrained(model_dir, local_files_only=True).to(device).eval()
    processor = CrossLMMProcessor.from_pretrained(model_dir, config=model.config, **processor_options)
    return model, processor


@torch.inference_mode()
def answer(
    model: CrossLMMForCausalLM,
    processor: CrossLMMProcessor,
    question: str,
    media: Sequence[str | os.PathLike] = (),
    **generation: Any,
) -> str:
    """The model's answer to `question` about `media` (videos or images, in order). The
    question may place the media with `<video>`/`<image>`; otherwise they come first."""
    if media and not any(tag in question for tag in ("<video>", "<image>", "<media>")):
        question = "".join("<video>\n" for _ in media) + question
    inputs = processor([{"role": "user", "content": question}], media=list(media))
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    generation.setdefault("max_new_tokens", 64)
    output = model.generate(**inputs, **generation)
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
