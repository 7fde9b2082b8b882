"""Local checkpoints only, and one way to put pretrained weights into a CrossLMM.

Policy: nothing is downloaded at run time. Every path must be a local directory with a
`config.json`; transformers is always called with `local_files_only=True`; the model
family is read from `config.json`'s `model_type`, never guessed from a path name (the
reference codebase's substring match on "siglip" in a path is exactly the trap).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers.initialization import no_init_weights

from crosslmm.model.configuration import CrossLMMConfig
from crosslmm.model.modeling import CrossLMMForCausalLM


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or does not fit the model."""


def read_config_json(directory: str | Path) -> dict:
    """The parsed config.json of a local checkpoint directory, or a CheckpointError naming it."""
    directory = Path(directory)
    path = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist (only local directories are used)")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a transformers checkpoint directory holds a config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err


def assemble(config: CrossLMMConfig, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> CrossLMMForCausalLM:
    """A CrossLMM whose weights come from `state` (CrossLMM names) where given, and are
    freshly initialised elsewhere (DCAL blocks closed, a new projector).

    The model is built without running initialisers (its memory is never touched before
    the pretrained tensors replace it), so assembling a 7B model costs one copy of the
    weights, not two. Every shape mismatch is reported at once, with the key and both
    shapes."""
    with no_init_weights():
        model = CrossLMMForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    own = model.state_dict()
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)}, model expects {tuple(own[key].shape)}"
        for key, value in state.items()
        if key in own and tuple(value.shape) != tuple(own[key].shape)
    ]
    if mismatched:
        raise CheckpointError("checkpoint tensors do not fit the model:\n  " + "\n  ".join(mismatched))
    loadable = {key: value.to(own[key].dtype) for key, value in state.items() if key in own}
    model.load_state_dict(loadable, strict=False, assign=True)
    loaded = set(loadable)
    for name, param in model.named_parameters():
        if name in loaded:
            param._is_hf_initialized = True  # transformers' initialisers skip flagged tensors
    model.initialize_weights()  # everything not loaded: DCAL (closed blocks), projector, newline
    model.tie_weights()
    return model.eval()
