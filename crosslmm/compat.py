"""The one place that knows how transformers' names changed across the supported range.

transformers 5.24 renamed two things CrossLMM calls:

- the KV cache: the forward argument and model-output field `past_key_values` became
  `cache` (the old name is a deprecated alias until 5.40);
- gradient checkpointing: `gradient_checkpointing_enable(gradient_checkpointing_kwargs=)`
  became `activation_checkpointing_enable(activation_checkpointing_kwargs=)`.

Everything else in crosslmm speaks the new names and goes through this module to talk
to a transformers model, so that on every supported release (docs/compatibility.md) it
calls exactly the name that release expects and never triggers a deprecation warning.
Each rename is detected by what the installed library has, not by its version number:
a backport or a pre-release then does the right thing too.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# The name transformers' own forward arguments and outputs use for the LLM's KV cache.
CACHE_NAME: str = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# Old names that mean the cache, which our own API still accepts (with a FutureWarning).
DEPRECATED_CACHE_NAMES: tuple[str, ...] = ("past_key_values",)
# Whether `activation_checkpointing_enable` exists (5.24+) or only `gradient_checkpointing_enable`.
HAS_ACTIVATION_CHECKPOINTING: bool = hasattr(PreTrainedModel, "activation_checkpointing_enable")


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """Keyword arguments that hand `cache` to a transformers model's forward."""
    return {CACHE_NAME: cache}


def output_cache(outputs: Any) -> Any:
    """The KV cache of a transformers model output, read under the installed name."""
    return getattr(outputs, CACHE_NAME)


def resolve_cache_argument(cache: Any, kwargs: dict[str, Any], owner: str) -> Any:
    """Take a deprecated cache keyword (`past_key_values=`) out of `kwargs` for our own
    API (`CrossLMMForCausalLM.forward`), warn once per call site, and return the cache."""
    for old in DEPRECATED_CACHE_NAMES:
        if old not in kwargs:
            continue
        value = kwargs.pop(old)
        if cache is not None:
            raise ValueError(f"{owner}: pass the KV cache as `cache` only, not both `cache` and `{old}`")
        warnings.warn(f"{owner}: `{old}` is deprecated, pass `cache` instead", FutureWarning, stacklevel=3)
        cache = value
    return cache


def enable_activation_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """Recompute each decoder/DCAL layer in backward instead of storing its activations
    (transformers' gradient checkpointing, under whichever name the release has)."""
    options = {"use_reentrant": use_reentrant}
    if HAS_ACTIVATION_CHECKPOINTING:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
