"""Where is a named sprite's pattern lost between the originals and the answer? Linear probes on each step of T2V's read.

For "What pattern does the X have?" the from-scratch models answer about half the time,
while their originals carry a patch's pattern (95 %) and the residual stream of the query
that predicts the answer holds it no better than the model answers (docs/synthetic.md,
thirteenth session). For the first N short-answer questions of that kind in a synthetic
world's records (`--split train`: its training records), this fits a linear classifier
for the true pattern (four, chance about 25 %; first 70 % fitted, the rest scored, by
`query_quadrant_probe.ridge_score` at a weak and a strong ridge: what is there, and what
stands out) on:

- the mean of the originals over the named sprite's patches in every frame it is visible
  (the grounding loss's target, `world.grounding_targets`): what a read that put all its
  attention on the sprite, evenly, could give;
- per T2V layer, at the answer's query: the attention's read before `o_proj` (every head
  concatenated, `probabilities @ values`, and a sink's value in its share), the same read
  with the attention restricted to the sprite's patches (renormalised), the plain mean of the values over the sprite (what
  the layer's values could give to an even read), and the gated update added to the
  residual stream;
- the residual stream after each of those layers.

A read that holds the pattern where the update does not points at `o_proj` or the gate; a
sprite-restricted read that holds it where the real read does not points at the
attention that lands elsewhere; the values' even mean holding it where the
sprite-restricted read does not points at how the attention is spread over the sprite;
neither holding it points at the values themselves.

    python tools/pattern_read_probe.py MODEL CHECKPOINT|- DATA_ROOT N [--split train]
"""
from __future__ import annotations

import json

import torch

from crosslmm.data.processor import IGNORE_INDEX
from crosslmm.synth.world import grounding_targets, scene_for, video_index
from pattern_readout_probe import PATTERNS, named_pattern_questions, split_parser
from probe_model import load_probed
from query_quadrant_probe import ridge_score

# A weak and a strong probe: information present (a linear map keeps it), and information
# that stands out in the features' variance. The fourteenth session's figures came from
# `fit_and_score` (logistic, L2 1e-3 on the summed squared weights), which read like the
# strong one and took "present but faint" for "lost" (docs/synthetic.md, fifteenth session).
RIDGE_STRENGTHS = (0.01, 1.0)


def t2v_reads(model, item: dict, targets: list[int]) -> dict[str, torch.Tensor]:
    """One forward; per T2V layer the read, the sprite-only read and the update at the
    answer's query, the residual after the layer, and the mean of the marked originals
    over `targets` (indices frame * N + patch)."""
    query = int((item["labels"] != IGNORE_INDEX).nonzero()[0]) - 1
    seen: dict[int, dict] = {}
    hooks = []
    for i, layer in enumerate(model.decoder_layers):
        if getattr(layer, "t2v", None) is None:
            continue

        def on_layer(_m, _args, kwargs, out, i=i):
            seen.setdefault(i, {})["ctx"] = kwargs["dcal_context"]
            seen[i]["residual"] = out[0] if isinstance(out, tuple) else out

        def on_t2v(_m, args, out, i=i):
            seen.setdefault(i, {})["t2v"] = (args, out)

        hooks.append(layer.register_forward_hook(on_layer, with_kwargs=True))
        hooks.append(layer.t2v.register_forward_hook(on_t2v))
    try:
        model(input_ids=item["input_ids"][None], pixel_values=item["pixel_values"],
              media_num_frames=item["media_num_frames"])
    finally:
        for hook in hooks:
            hook.remove()
    out: dict[str, torch.Tensor] = {}
    for i, parts in sorted(seen.items()):
        ctx, (args, update) = parts["ctx"], parts["t2v"]
        hidden, key, value = args[:3]  # (1, Lq, D), (1, Hkv, S, hd) x2
        at = query + parts["residual"].shape[1] - item["input_ids"].shape[0]  # visual tokens minus placeholders first
        column = int((ctx.t2v.query_index[0] == at).nonzero()[0])
        t2v = model.decoder_layers[i].t2v
        probs = t2v.probabilities(hidden[:, column:column + 1], key)[0, :, 0]  # (H, S)
        values = value[0].repeat_interleave(t2v.heads_per_group, dim=0).float()  # (H, S, hd)
        on_sprite = torch.zeros_like(probs)
        on_sprite[:, targets] = probs[:, targets]
        on_sprite = on_sprite / on_sprite.sum(-1, keepdim=True)
        read = torch.einsum("hs,hsd->hd", probs, values)  # (H, hd)
        if t2v.sink_value is not None:  # the sink's value, in the share the sink took
            sink = t2v.sink_value.float().repeat_interleave(t2v.heads_per_group, dim=0)  # (H, hd)
            read = read + (1 - probs.sum(-1, keepdim=True)) * sink
        out[f"layer {i}: read"] = read.reshape(-1)
        out[f"layer {i}: read on the sprite only"] = torch.einsum("hs,hsd->hd", on_sprite, values).reshape(-1)
        out[f"layer {i}: values, mean over the sprite"] = value[0][:, targets].float().mean(1).reshape(-1)
        out[f"layer {i}: update"] = update[0, column].float()
        out[f"layer {i}: residual after"] = parts["residual"][0, at].float()
        out[f"layer {i}: attention mass on the sprite"] = probs[:, targets].sum(-1).mean()[None]
        if "originals: mean over the sprite" not in out:  # the same in every layer
            originals = ctx.originals.reshape(-1, ctx.originals.shape[-1])  # (F*N, D), marked
            out["originals: mean over the sprite"] = originals[targets].float().mean(0)
    return out


@torch.no_grad()
def main() -> None:
    args = split_parser(__doc__).parse_args()
    model, processor = load_probed(args)
    meta = json.loads((args.records / "meta.json").read_text())["params"]
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    rows: dict[str, list[torch.Tensor]] = {}
    truth = []
    for record in named_pattern_questions(args.records, args.split):
        if len(truth) == args.n:
            break
        question = record["conversations"][0]["value"]
        scene = scene_for(meta["seed"], video_index(record["video"]), meta["frames"], meta["size"])
        targets = grounding_targets(scene, question, grid)
        if not targets:
            continue
        for name, row in t2v_reads(model, processor.encode_record(record, args.records), targets).items():
            rows.setdefault(name, []).append(row)
        truth.append(PATTERNS.index(record["answer"]))
    y = torch.tensor(truth)
    result = {"model": str(args.model), "checkpoint": args.checkpoint, "split": args.split, "questions": len(y)}
    for name, stack in rows.items():
        x = torch.stack(stack)
        if "mass" in name:
            result[name] = round(float(x.mean()), 3)
        else:
            result[name] = {f"ridge {strength}": round(ridge_score(x, y, len(PATTERNS), strength), 3)
                            for strength in RIDGE_STRENGTHS}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
