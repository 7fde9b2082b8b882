"""`crosslmm params`: parameter counts per component and what each stage trains.

Counted on the meta device from a preset or a checkpoint's config.json, so the 7B
shapes answer in seconds without any weights.
"""

from __future__ import annotations

import torch

from crosslmm.checkpoints.assemble import read_config_json
from crosslmm.model.configuration import CrossLMMConfig
from crosslmm.model.modeling import CrossLMMForCausalLM, parameter_part
from crosslmm.presets import PRESETS, preset_config

PAPER_STAGE1_TRAINABLE_2B = 43e6  # Table 3: projector + cross-attention, CrossLMM-2B


def load_config(preset_or_dir: str) -> CrossLMMConfig:
    if preset_or_dir in PRESETS:
        return preset_config(preset_or_dir)
    read_config_json(preset_or_dir)  # a clear error for a missing directory or file
    return CrossLMMConfig.from_pretrained(preset_or_dir, local_files_only=True)


def component(name: str) -> str:
    """The part of `parameter_part`, with the gates counted on their own."""
    return "gates" if name.endswith(".gate") else parameter_part(name)


def count_parameters(config: CrossLMMConfig, stage: int) -> dict:
    """Counts per component and the stage's trainable total. Stage 1 trains the
    projector and V2V (with its gates); stage 2 trains everything, T2V switched on."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    if stage == 2 and not config.use_t2v:
        config = CrossLMMConfig(**{**config.to_dict(), "use_t2v": True})
    with torch.device("meta"):
        model = CrossLMMForCausalLM(config)
    counts = dict.fromkeys(("vision", "projector", "llm", "v2v", "t2v", "gates"), 0)
    gate_owner: dict[str, int] = {"v2v": 0, "t2v": 0}
    seen = set()
    for name, param in model.named_parameters():
        if id(param) in seen:  # tied embeddings count once
            continue
        seen.add(id(param))
        part = component(name)
        counts[part] += param.numel()
        if part == "gates":
            gate_owner["v2v" if ".v2v." in name else "t2v"] += param.numel()
    if stage == 1:
        trainable = counts["projector"] + counts["v2v"] + gate_owner["v2v"]
    else:
        trainable = sum(counts.values())
    result = {
        "stage": stage,
        "components": counts,
        "total": sum(counts.values()),
        "trainable": trainable,
        "dcal_layers": config.dcal_layer_indices,
        "v2v_layers": config.v2v_layer_indices,
    }
    if config.use_v2v and not config.v2v_at_last_layer and config.v2v_layer_indices != config.dcal_layer_indices:
        # The paper's layout builds V2V at the final layer too: its count, for comparison.
        paper_layout = CrossLMMConfig(**{**config.to_dict(), "v2v_at_last_layer": True})
        result["trainable_with_last_layer_v2v"] = count_parameters(paper_layout, stage)["trainable"]
    return result


def describe(result: dict, name: str) -> str:
    lines = [f"{name}: parameters per component"]
    for part, count in result["components"].items():
        lines.append(f"  {part:>10}: {count:>14,d}" if part == "gates" else f"  {part:>10}: {count / 1e6:12.3f} M")
    lines.append(f"  {'total':>10}: {result['total'] / 1e6:12.3f} M")
    lines.append(f"stage {result['stage']} trainable: {result['trainable'] / 1e6:.3f} M "
                 f"(DCAL in layers {result['dcal_layers']}, V2V in {result['v2v_layers']})")
    if name == "crosslmm-2b" and result["stage"] == 1:
        ratio = result["trainable"] / PAPER_STAGE1_TRAINABLE_2B
        lines.append(f"paper (Table 3, projector + cross-attention): ~43 M; this model: "
                     f"{result['trainable'] / 1e6:.1f} M ({100 * ratio:.1f} % of it)")
        if "trainable_with_last_layer_v2v" in result:
            full = result["trainable_with_last_layer_v2v"]
            lines.append(f"  with a V2V block at the final layer too, as the paper counts (v2v_at_last_layer=true): "
                         f"{full / 1e6:.1f} M ({100 * full / PAPER_STAGE1_TRAINABLE_2B:.1f} %); that block's output "
                         "is read by nothing, so it is not built by default")
    return "\n".join(lines)
