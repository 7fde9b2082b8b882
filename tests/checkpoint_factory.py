"""Tiny but real checkpoints on disk: vision encoders, LLMs and a trained BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from conftest import TEXT, VISION

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "a red square moves to the left while a blue circle stays still",
    "what colour is the object in the top left corner at the start of the video",
    "the green triangle appears after the yellow star and before the white glyph",
    "how many circles appear in the video? three circles appear",
    "system user assistant you are a helpful assistant answer with one word",
] * 20


def make_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here, with ChatML specials and chat template (Qwen's convention)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
    )
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    return fast


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
