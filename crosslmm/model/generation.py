"""Greedy and sampled decoding for CrossLMM with two caches.

The prompt (text + media) is processed once, left-padded: the vision tower, V2V and the
T2V keys/values of every DCAL run there and only there. Each new token then runs the LLM
with its ordinary KV cache and T2V against the side cache (`CrossAttentionCache`).
Several return sequences of one request expand the LLM cache but share the side cache.

Sampling reuses transformers' logits warpers (temperature, top-k, top-p) so the knobs
mean what they mean everywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass
class GenerateOutput:
    """`generate(..., return_dict_in_generate=True)`: the sequences and the state to go on
    from. `cache` and `cross_attention_cache` hold every position of `attention_mask`
    (the prompt and all generated tokens but the last, which was never fed back): pass
    them to `generate` again with the next tokens to continue a conversation without
    recomputing it."""

    sequences: torch.LongTensor  # (rows, L + new)
    cache: Any
    cross_attention_cache: Any
    attention_mask: torch.Tensor  # (rows, positions in the caches)
    logits: torch.Tensor | None = None  # (rows, new, vocab) with return_logits


# Decoding options and their defaults; a `generation_config` may set any of them, an
# explicit keyword argument wins over it (transformers' precedence).
GENERATION_DEFAULTS: dict[str, object] = {
    "max_new_tokens": 64,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": None,
    "top_p": None,
    "repetition_penalty": None,
    "num_return_sequences": 1,
    "num_beams": 1,
    "eos_token_id": None,
    "pad_token_id": None,
}


@torch.no_grad()
def generate(
    model,
    input_ids: torch.LongTensor,  # (B, L) prompts with media placeholders, left- or right-padded
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    media_num_frames: torch.Tensor | None = None,
    vision_features: torch.Tensor | None = None,
    *,
    generation_config=None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer=None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
    streamer=None,
    cache=None,
    cross_attention_cache=None,
    return_dict_in_generate: bool = False,
    **options,
) -> torch.LongTensor | tuple[torch.LongTensor, torch.Tensor] | GenerateOutput:
    """Return (B * num_return_sequences, L + new) token ids: each prompt (as given, with its
    placeholders) followed by its generated tokens, padded with `pad_token_id` after EOS.
    With `return_logits`, also the raw float32 logits of every step (rows, new, vocab).

    Takes the arguments transformers' `generate` callers pass (evaluation harnesses
    among them): the decoding options of `GENERATION_DEFAULTS` as keywords or in a
    `generation_config` (a transformers `GenerationConfig`; its `max_length` is ignored,
    `max_new_tokens` counts), `stop_strings` with the `tokenizer` to read them (a row
    stops once its text contains one; the string stays in the output, as in
    transformers), `use_cache` (accepted either way: decoding always uses the KV and
    cross-attention caches, which give the same tokens), and `num_beams=1` (beam search
    is not implemented).

    `streamer` (transformers' protocol: `put(ids)` with the prompt, then each step's new
    tokens (rows,), then `end()`) sees tokens as they are chosen. `cache` and
    `cross_attention_cache` from an earlier `return_dict_in_generate=True` call continue
    it: `input_ids` are then only the new tokens and `attention_mask`, if given, covers
    the cached positions and the new ones."""
    settings = _decoding_settings(generation_config, options)
    max_new_tokens, do_sample = settings["max_new_tokens"], settings["do_sample"]
    temperature, top_k, top_p = settings["temperature"], settings["top_k"], settings["top_p"]
    repetition_penalty, num_return_sequences = settings["repetition_penalty"], settings["num_return_sequences"]
    eos_token_id, pad_token_id = settings["eos_token_id"], settings["pad_token_id"]
    if settings["num_beams"] != 1:
        raise ValueError(f"beam search is not implemented (num_beams={settings['num_beams']}); decode greedily or sample with num_beams=1")
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
    if stops and tokenizer is None:
        raise ValueError("stop_strings needs the tokenizer to read the generated text: pass tokenizer=processor.tokenizer")
    if any(not stop for stop in stops):
        raise ValueError("stop_strings must be non-empty strings")
    text_config = model.config.text_config
    eos = eos_token_id if eos_token_id is not None else text_config.eos_token_id
    eos_ids = torch.as_tensor([] if eos is None else eos, device=input_ids.device, dtype=torch.long).reshape(-1)
    if pad_token_id is None:
        pad_token_id = text_config.pad_token_id if text_config.pad_token_id is not None else (int(eos_ids[0]) if eos_ids.numel() else 0)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
    if num_return_sequences > 1 and not do_sample:
        raise ValueError("num_return_sequences > 1 with greedy decoding would return identical copies; set do_sample=True")
    if cache is not None and num_return_sequences > 1:
        raise ValueError("num_return_sequences > 1 cannot continue a cache (it holds one sequence per row)")
    if cache is not None and cache.get_seq_length() > 0:
        # Continue a conversation: only the new tokens run, against both caches.
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape[0], cache.get_seq_length() + input_ids.shape[1],
                                        dtype=torch.long, device=input_ids.device)
        out = model(input_ids, attention_mask=attention_mask, cache=cache, cross_attention_cache=cross_attention_cache,
                    use_cache=True, logits_to_keep=1)
    else:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Left padding after media expansion: every row's last position is its newest token.
        out = model(
            input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            media_num_frames=media_num_frames,
            vision_features=vision_features,
            use_cache=True,
            logits_to_keep=1,
            padding_side="left",
        )
    if streamer is not None:
        streamer.put(input_ids.cpu())
    past, cross_cache, mask = out.cache, out.cross_attention_cache, out.attention_mask
    logits = out.logits[:, -1].float()
    if num_return_sequences > 1:
        past.batch_repeat_interleave(num_return_sequences)
        mask = mask.repeat_interleave(num_return_sequences, dim=0)
        logits = logits.repeat_interleave(num_return_sequences, dim=0)
        if cross_cache is not None:
            cross_cache.sequences_per_group = num_return_sequences

    processors = _logits_processors(do_sample, temperature, top_k, top_p, repetition_penalty)
    rows = logits.shape[0]
    prompts = input_ids.repeat_interleave(num_return_sequences, dim=0)
    generated = torch.empty(rows, 0, dtype=torch.long, device=input_ids.device)
    step_logits = []
    finished = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        step_logits.append(logits)
        scores = processors(torch.cat([prompts, generated], dim=1), logits) if processors else logits
        if do_sample:
            next_token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
        else:
            next_token = scores.argmax(dim=-1)
        next_token = torch.where(finished, pad_token_id, next_token)
        generated = torch.cat([generated, next_token[:, None]], dim=1)
        if streamer is not None:
            streamer.put(next_token.cpu())
        finished |= torch.isin(next_token, eos_ids)
        if stops:
            finished |= _hit_stop_string(generated, finished, stops, tokenizer)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        out = model(
            next_token[:, None],
            attention_mask=mask,
            cache=past,
            cross_attention_cache=cross_cache,
            use_cache=True,
        )
        logits = out.logits[:, -1].float()

    if streamer is not None:
        streamer.end()
    sequences = torch.cat([prompts, generated], dim=1)
    all_logits = torch.stack(step_logits, dim=1) if return_logits else None
    if return_dict_in_generate:
        return GenerateOutput(sequences, past, cross_cache, mask, all_logits)
    return (sequences, all_logits) if return_logits else sequences


def _decoding_settings(generation_config, options: dict) -> dict:
    unknown = sorted(set(options) - set(GENERATION_DEFAULTS))
    if unknown:
        raise TypeError(f"generate() got unexpected keyword argument(s) {', '.join(unknown)}; "
                        f"decoding options are {', '.join(GENERATION_DEFAULTS)}")
    settings = dict(GENERATION_DEFAULTS)
    if generation_config is not None:
        for name in GENERATION_DEFAULTS:
            value = getattr(generation_config, name, None)
            if value is not None:
                settings[name] = value
    settings.update(options)
    return settings


def _hit_stop_string(generated: torch.Tensor, finished: torch.Tensor, stops: list[str], tokenizer) -> torch.Tensor:
    """Rows whose generated text now contains a stop string. Only the last tokens are
    decoded: a string of c characters lies within the last c tokens (every token has at
    least one character)."""
    window = max(len(stop) for stop in stops) + 1
    hits = torch.zeros_like(finished)
    for row in (~finished).nonzero().flatten().tolist():
        text = tokenizer.decode(generated[row, -window:].tolist(), skip_special_tokens=False)
        hits[row] = any(stop in text for stop in stops)
    return hits


def _logits_processors(do_sample, temperature, top_k, top_p, repetition_penalty) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if do_sample:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    return processors
