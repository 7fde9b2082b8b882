"""Tiny but real checkpoints on disk: vision encoders, LLMs and a trained BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from crosslmm.checkpoints.scratch import train_tokenizer

from conftest import TEXT, VISION

CORPUS = [
    "a red square moves to the left while a blue circle stays still",
    "what colour is the object in the top left corner at the start of the video",
    "the green triangle appears after the yellow star and before the white glyph",
    "how many circles appear in the video? three circles appear",
    "system user assistant you are a helpful assistant answer with one word",
] * 20


def make_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """The library's from-scratch tokenizer (byte-level BPE, ChatML) without the media
    token, as a stock LLM's tokenizer would be: building adds it."""
    tokenizer = train_tokenizer(CORPUS, vocab_size=300, media_token=False)
    tokenizer.save_pretrained(directory)
    return tokenizer


def make_vision(kind: str, directory: Path, seed: int = 0) -> Path:
    from transformers import AutoModel

    torch.manual_seed(seed)
    AutoModel.from_config(VISION[kind]()).save_pretrained(directory)
    return directory


def make_llm(kind: str, directory: Path, seed: int = 0, tie: bool = False) -> Path:
    tokenizer = make_tokenizer(directory)
    config = TEXT[kind]()
    config.vocab_size = len(tokenizer)  # no spare rows: building must resize for the media token
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.tie_word_embeddings = tie
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory
