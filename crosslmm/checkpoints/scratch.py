"""`crosslmm init`: a randomly initialised CrossLMM with its own tokenizer.

For models trained from scratch (the synthetic world's small models, throughput
measurements, tests): a byte-level BPE tokenizer is trained on the dataset's own text with
the `tokenizers` library, given Qwen's ChatML special tokens and chat template plus the
`<media>` placeholder, and a preset's shapes are sized to its vocabulary. The result is a
directory that every other command reads like a built checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from crosslmm.checkpoints.build import MEDIA_TOKEN, load_vision
from crosslmm.data.processor import PLACEHOLDERS
from crosslmm.model.modeling import CrossLMMForCausalLM
from crosslmm.presets import preset_config

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, media_token: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text stays encodable) with ChatML specials and template, and
    the `<media>` placeholder unless `media_token=False` (a stock LLM's tokenizer)."""
    specials = CHATML_SPECIALS + ([MEDIA_TOKEN] if media_token else [])
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if media_token:
        fast.add_special_tokens({"additional_special_tokens": [MEDIA_TOKEN]})
    fast.chat_template = CHATML_TEMPLATE
    return fast


def corpus_from_records(paths: Iterable[str | Path]) -> list[str]:
    """Every conversation turn of LLaVA-format record files, placeholders removed, plus
    the chat roles the template writes."""
    texts = ["system", "user", "assistant"]
    for path in paths:
        path = Path(path)
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            records = json.loads(path.read_text())
        for record in records:
            for turn in record.get("conversations", []):
                text = turn["value"]
                for placeholder in PLACEHOLDERS:
                    text = text.replace(placeholder, "")
                texts.append(text.strip())
    return texts


def siglip_preprocessor_config(image_size: int) -> dict:
    """What SigLIP's own image processor config says: square resize, bicubic, mean=std=0.5."""
    return {
        "image_processor_type": "SiglipImageProcessor", "do_resize": True,
        "size": {"height": image_size, "width": image_size}, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    }


def init_from_scratch(
    preset: str, out_dir: str | Path, corpus: list[str], vocab_size: int = 1024, seed: int = 0,
    vision: str | Path | None = None, language: str | Path | None = None, **overrides: Any
) -> Path:
    """A CrossLMM at `preset`'s shapes with a tokenizer trained on `corpus`; everything
    random (from `seed`) except, when `vision` names a vision-encoder checkpoint of the
    preset's shape, the vision tower, which is loaded from it, and, when `language` names
    a CrossLMM checkpoint of the same preset (e.g. the text-pretrained base of
    `configs/synth/text.yaml`), the language model and the tokenizer, taken from it: the
    synthetic world's analogue of starting every variant from one pretrained Qwen2.5."""
    if language is not None:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(language, local_files_only=True)
    else:
        tokenizer = train_tokenizer(corpus, vocab_size)
    config = preset_config(preset, media_token_id=tokenizer.convert_tokens_to_ids(MEDIA_TOKEN), **overrides)
    text = config.text_config
    text.vocab_size = len(tokenizer)
    text.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text.pad_token_id = tokenizer.pad_token_id
    text.bos_token_id = None
    torch.manual_seed(seed)
    model = CrossLMMForCausalLM(config)
    if vision is not None:
        load_vision_weights(model, vision)
    if language is not None:
        load_language_weights(model, language)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(siglip_preprocessor_config(config.image_size), indent=2))
    return out_dir


def load_language_weights(model: CrossLMMForCausalLM, checkpoint: str | Path) -> None:
    """Copy the language model of a CrossLMM checkpoint (read by `from_pretrained`, so
    shards, dtypes and tied embeddings are handled as for any checkpoint) into `model`.
    DCAL blocks are excluded: they are new per variant; every other LLM tensor must fit."""
    base = CrossLMMForCausalLM.from_pretrained(checkpoint, local_files_only=True, dtype=torch.float32)
    state = {k: v for k, v in base.language_model.state_dict().items() if ".v2v." not in k and ".t2v." not in k}
    try:
        missing, unexpected = model.language_model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape mismatch
        raise ValueError(f"language checkpoint {checkpoint} does not fit the preset's LLM: {err}") from err
    missing = [k for k in missing if ".v2v." not in k and ".t2v." not in k]
    if missing or unexpected:
        raise ValueError(
            f"language checkpoint {checkpoint} does not fit the preset's LLM: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def load_vision_weights(model: CrossLMMForCausalLM, vision_dir: str | Path) -> None:
    """Copy a vision-encoder checkpoint into the model's tower. Every tensor the tower
    has must come from the checkpoint with the same shape (the checkpoint may have more:
    layers after the feature layer, which the tower never builds)."""
    encoder = load_vision(vision_dir)
    own = model.vision_tower.vit.state_dict()
    state = encoder.state_dict()
    missing = sorted(k for k in own if k not in state)
    mismatched = sorted(k for k in own if k in state and state[k].shape != own[k].shape)
    if missing or mismatched:
        raise ValueError(
            f"vision checkpoint {vision_dir} does not fit the preset's vision tower: "
            f"missing {missing[:5]}, shape mismatch {mismatched[:5]}"
        )
    model.vision_tower.vit.load_state_dict({k: state[k] for k in own})
