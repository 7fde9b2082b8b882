"""FLOP counting with torch's FlopCounterMode, including attention on the CPU.

torch counts the CUDA attention kernels but not `_scaled_dot_product_flash_attention_for_cpu`
(what SDPA dispatches to on the CPU), so a CPU count would silently leave out every
attention. The CPU kernel gets the same formula as the CUDA ones: 2*B*H*Lq*S*(d_qk + d_v).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _sdpa_cpu_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    batch, heads, num_queries, head_dim = query_shape
    num_keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * num_queries * num_keys * (head_dim + value_dim)


def flop_counter(display: bool = False, depth: int = 3) -> FlopCounterMode:
    """A FlopCounterMode that also counts CPU attention."""
    return FlopCounterMode(display=display, depth=depth, custom_mapping={_CPU_SDPA: _sdpa_cpu_formula})


# --------------------------------------------------------------------------- counting at real shapes

# One prefill's cost per component ("vit" is the ViT's linear layers and patch embedding,
# "vit_attention" its attention scores). Linear layers and attention scores are told apart by
# the aten op: nn.Linear dispatches to mm/addmm; attention (on the meta device SDPA runs
# its math decomposition) to bmm, which counts QK^T and the weighted sum of V over every
# (query, key) pair, the causal half included (a dense count; `crosslmm bench flops` also
# reports totals without any attention scores, the convention of the paper's Fig. 4).
COMPONENTS = ("vit", "vit_attention", "projector", "llm_linear", "llm_attention", "cross_attention_projections",
              "cross_attention_scores")
SCORES = ("vit_attention", "llm_attention", "cross_attention_scores")  # attention over (query, key) pairs
_SCORE_OPS = {"aten.bmm", "aten.baddbmm"}
PROMPT_TOKENS = 64  # text tokens around the video, as in `crosslmm bench efficiency`


def _split(ops: dict) -> tuple[float, float]:
    """(linear, attention-score) FLOPs of one module's per-op counts."""
    scores = sum(float(v) for op, v in ops.items() if str(op) in _SCORE_OPS)
    return sum(float(v) for v in ops.values()) - scores, scores


def _components(counts: dict[str, dict], llm: str, num_layers: int) -> dict[str, float]:
    """Group FlopCounterMode's per-module counts (names relative to the module called:
    `VisionTower`, `Projector`, `<LLM class>...`) into COMPONENTS."""
    empty: dict = {}
    flops = dict.fromkeys(COMPONENTS, 0.0)
    flops["vit"], flops["vit_attention"] = _split(counts.get("VisionTower", empty))
    flops["projector"] = sum(_split(counts.get("Projector", empty)))
    flops["llm_linear"] = sum(_split(counts.get(f"{llm}.lm_head", empty)))
    for i in range(num_layers):
        layer = f"{llm}.model.layers.{i}"
        linear, scores = _split(counts.get(layer, empty))
        for child, (lin_part, score_part) in (("self_attn", ("llm_linear", "llm_attention")),
                                              ("mlp", ("llm_linear", "llm_attention")),
                                              ("v2v", ("cross_attention_projections", "cross_attention_scores")),
                                              ("t2v", ("cross_attention_projections", "cross_attention_scores"))):
            child_linear, child_scores = _split(counts.get(f"{layer}.{child}", empty))
            flops[lin_part] += child_linear
            flops[score_part] += child_scores
            linear, scores = linear - child_linear, scores - child_scores
        # What a DCAL layer computes outside its children: the keys and values of the
        # originals (`project_key_value`, once per block and forward).
        flops["cross_attention_projections"] += linear
        flops["cross_attention_scores"] += scores
    # What the LLM computes outside its layers and head (the rotary embedding's angles,
    # a few kFLOPs on some transformers releases) belongs to its attention.
    llm_total = sum(_split(counts.get(llm, empty)))
    llm_parts = ("llm_linear", "llm_attention", "cross_attention_projections", "cross_attention_scores")
    flops["llm_attention"] += llm_total - sum(flops[c] for c in llm_parts)
    flops["total"] = sum(flops[c] for c in COMPONENTS)
    return flops


def prompt_ids(config, prompt_tokens: int = PROMPT_TOKENS) -> torch.Tensor:
    """(1, prompt_tokens + 1): text tokens around one media placeholder, the counted prompt."""
    half = prompt_tokens // 2
    return torch.tensor([[3] * half + [config.media_token_id] + [3] * (prompt_tokens - half)])


def meta_model(config):
    """A CrossLMM of `config` on the meta device: shapes only, nothing allocated."""
    from crosslmm.model.modeling import CrossLMMForCausalLM

    with torch.device("meta"):
        return CrossLMMForCausalLM(config).eval()


def count_prefill(config, frames: int, prompt_tokens: int = PROMPT_TOKENS, all_logits: bool = False,
                  model=None) -> dict[str, float]:
    """FLOPs (2 x multiply-adds, torch's convention) of one prefill of `frames` frames and
    `prompt_tokens` text tokens, per component, on the meta device: the real modules run
    at the real shapes, but no weight or activation is ever allocated, so CrossLMM-7B at
    256 frames counts in seconds on a laptop.

    The vision tower, the projector and the LLM with its DCAL layers are called exactly as
    `CrossLMMForCausalLM.forward` calls them; only the placement of text and visual
    embeddings (index copies, no FLOPs) is skipped, and the layout is computed from a real
    prompt on the CPU and then moved to the meta device. A test checks the count against
    FlopCounterMode on a real forward of the tiny preset. `all_logits` applies the LM head
    at every position (a plain training-style forward) instead of the last one only.
    `model`: a `meta_model(config)` to reuse across frame counts."""
    from crosslmm.model.dcal import DCALContext
    from crosslmm.model.splice import build_layout

    model = model if model is not None else meta_model(config)
    layout = build_layout(
        prompt_ids(config, prompt_tokens), None, None, torch.tensor([frames]), media_token_id=config.media_token_id,
        pooled_tokens_per_frame=config.tokens_per_frame, v2v_scope=config.v2v_scope,
        tokens_after_media=config.tokens_after_media, max_length=None, padding_side="right",
    )
    meta = torch.device("meta")
    with torch.no_grad(), flop_counter(depth=100) as counter:
        pixels = torch.empty(frames, 3, config.image_size, config.image_size, device=meta)
        _, originals = model.encode_media(pixel_values=pixels)
        context = None
        if config.use_dcal:
            context = DCALContext(originals, originals.shape[1], layout.v2v and layout.v2v.to(meta),
                                  layout.t2v and layout.t2v.to(meta))
        embeds = torch.empty(1, layout.length, config.text_config.hidden_size, device=meta)
        # One unpadded sample: the default positions 0..L'-1 are the layout's. Without a mask
        # and with a (meta) cache, transformers never reads a tensor's values, which meta
        # tensors do not have (with no cache it inspects the positions for packed sequences).
        model.language_model(inputs_embeds=embeds, dcal_context=context, logits_to_keep=0 if all_logits else 1,
                             use_cache=True)
    flops = _components(counter.get_flop_counts(), type(model.language_model).__name__,
                        config.text_config.num_hidden_layers)
    counted = float(counter.get_total_flops())
    if abs(counted - flops["total"]) > 1e-6 * max(counted, 1.0):
        raise RuntimeError(f"components add up to {flops['total']:.4g} FLOPs but the counter saw {counted:.4g}")
    return flops


def flops_rows(preset: str, frames: list[int], tokens_per_frame: list[int], all_logits: bool = False) -> list[dict]:
    """Rows for `crosslmm bench flops`: every CrossLMM layout and LLaVA-OneVision's
    computation (its layout on the same ViT and LLM) at every frame count."""
    from crosslmm.presets import preset_config

    layouts = [(f"crosslmm-{g}", preset_config(preset, tokens_per_frame=g)) for g in tokens_per_frame]
    # Released LLaVA-OV checkpoints drop SigLIP's last layer: the same ViT depth as our -2.
    layouts.append(("llava-ov", preset_config(preset, vision_feature_layer=-2).to_llava_ov_compatible()))
    models = {name: meta_model(config) for name, config in layouts}
    rows = []
    for n in frames:
        for name, config in layouts:
            flops = count_prefill(config, n, all_logits=all_logits, model=models[name])
            rows.append({"model": name, "frames": n, "tokens_per_frame": config.tokens_per_frame,
                         "flops": flops, "macs": {k: v / 2 for k, v in flops.items()}})
    return rows


# Paper figures (method.md section 4), in the paper's "TFLOPs", which are multiply-adds:
# our MAC counts reproduce them (docs/performance.md, "FLOPs at the paper's shapes").
PAPER_TFLOPS = {
    ("crosslmm-7b", "llava-ov"): {32: 57.0, 64: 113.6, 128: 226.7, 256: 316.9},  # Fig. 4
    ("crosslmm-7b", "crosslmm-9"): {32: 13.2, 64: 25.9, 128: 51.4, 256: 102.4},  # Fig. 4
    ("crosslmm-2b", "crosslmm-9"): {32: 10.93, 256: 86.82},  # Table 6
}


def _without_scores(counts: dict[str, float]) -> float:
    return counts["total"] - sum(counts[c] for c in SCORES)


def flops_table(preset: str, rows: list[dict]) -> str:
    """Markdown: per frame count and model, MACs (with and without attention scores),
    FLOPs, the paper's figure and the CrossLMM / LLaVA-OV ratio."""
    lines = [
        "| frames | model | tokens/frame | TMACs | TMACs w/o attention scores | TFLOPs (2 x MACs) | paper \"TFLOPs\" "
        "| ours / paper (MACs) | ours w/o scores / paper | / LLaVA-OV (MACs) | / LLaVA-OV w/o scores | paper / LLaVA-OV |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    reference = {r["frames"]: r for r in rows if r["model"] == "llava-ov"}
    for r in rows:
        macs, paper = r["macs"], PAPER_TFLOPS.get((preset, r["model"]), {}).get(r["frames"])
        paper_ref = PAPER_TFLOPS.get((preset, "llava-ov"), {}).get(r["frames"])
        ref = reference.get(r["frames"])
        ratio = f"{macs['total'] / ref['macs']['total']:.1%}" if ref and r is not ref else ""
        ratio_linear = f"{_without_scores(macs) / _without_scores(ref['macs']):.1%}" if ref and r is not ref else ""
        paper_ratio = f"{paper / paper_ref:.1%}" if paper and paper_ref and r["model"] != "llava-ov" else ""
        vs_paper = f"{macs['total'] / 1e12 / paper - 1:+.1%}" if paper else ""
        vs_paper_linear = f"{_without_scores(macs) / 1e12 / paper - 1:+.1%}" if paper else ""
        lines.append(
            f"| {r['frames']} | {r['model']} | {r['tokens_per_frame']} | {macs['total'] / 1e12:.4g} "
            f"| {_without_scores(macs) / 1e12:.4g} | {r['flops']['total'] / 1e12:.4g} "
            f"| {paper or ''} | {vs_paper} | {vs_paper_linear} | {ratio} | {ratio_linear} | {paper_ratio} |"
        )
    return "\n".join(lines) + "\n"
