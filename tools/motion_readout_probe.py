"""Do T2V's two looks at a moving sprite carry its direction? Linear probes on motion questions.

With the grounding loss's two head groups (the sprite in its first and in its last
visible frame), T2V's heads put most of their attention where they are told, yet the
answers stayed at chance. This asks where the direction is lost. For the first N
motion questions of a world's held-out split (teacher-forced, as the grounding loss sees
them), softmax-regression probes (`originals_probe.probe_accuracy`: the first 80 % of the
questions train, the rest score) of the direction from:

- "looks": every T2V head's output at the query that predicts the answer (its attention
  times its values, before the output projection), all T2V layers concatenated;
- "oracle looks": the same values averaged over the sprite's patches in its first and
  its last frame exactly (what perfect attention would read): whether the values carry
  the place at all;
- "oracle originals": the originals (what the keys and values are projected from)
  averaged the same way;
- "looks, layer i": one T2V layer's head outputs;
- "T2V write, layer i": what that T2V adds to the residual stream there (its looks
  through the output projection and the gate);
- "residual after layer i": the residual stream at that query after each decoder layer
  (DCAL layers include their cross-attentions): where along the stack the direction
  fades, if the looks carry it.

Chance is the most frequent direction's share. Run it on a world the model did not
train on (its test split):

    python tools/motion_readout_probe.py MODEL CHECKPOINT|- DATA_ROOT N
"""
from __future__ import annotations

import inspect
import json
from collections import Counter

import torch
from originals_probe import probe_accuracy
from probe_model import load_probed, parser

from crosslmm.model.t2v_probe import T2VAttentionRecorder, t2v_layers
from crosslmm.synth.evaluate import split_scenes
from crosslmm.synth.world import grounding_targets, video_index
from crosslmm.train.grounding import grounded_queries

DIRECTIONS = ("left", "right", "up", "down", "static")


@torch.no_grad()
def main() -> None:
    args = parser(__doc__).parse_args()
    model, processor = load_probed(args)
    torch.manual_seed(0)
    scenes = dict(split_scenes(args.records, "test"))
    records = [r for r in json.loads((args.records / "test.json").read_text())
               if r["type"] == "motion_direction" and r["form"] == "short"][: args.n]
    grid = model.config.vision_grid_size
    features: dict[str, list[torch.Tensor]] = {"looks": [], "oracle looks": [], "oracle originals": []}
    labels = []
    for record in records:
        scene = scenes[video_index(record["video"])]
        first, last = grounding_targets(scene, record["conversations"][0]["value"], grid)
        item = processor.encode_record(record, args.records)
        vision = model.vision_tower(item["pixel_values"])
        batch = {"input_ids": item["input_ids"][None], "labels": item["labels"][None], "grounding": [[[first, last]]]}
        ((sample, rank, _),) = grounded_queries(batch, model.config.media_token_id)
        values = []  # per T2V call, in call order (as the recorder's rows)

        def keep(module, args_, kwargs):
            bound = inspect.signature(module.forward).bind(*args_, **kwargs)
            values.append(bound.arguments["value"])  # (G, Hkv, S, hd)

        residuals, where = [], {}  # per decoder layer (1, L', D); the query's flat position

        def find_query(layer, args_, kwargs):
            where.setdefault("flat", int(kwargs["dcal_context"].t2v.query_index[sample, rank]))

        def keep_residual(layer, args_, output):
            residuals.append(output[0] if isinstance(output, tuple) else output)

        layers = t2v_layers(model)
        hooks = [layer.t2v.register_forward_pre_hook(keep, with_kwargs=True) for layer in layers]
        hooks.append(layers[0].register_forward_pre_hook(find_query, with_kwargs=True))
        hooks += [layer.register_forward_hook(keep_residual) for layer in model.decoder_layers]
        with T2VAttentionRecorder(model, [(sample, rank)]) as recorder:
            model(input_ids=batch["input_ids"], vision_features=vision, media_num_frames=item["media_num_frames"])
        for hook in hooks:
            hook.remove()
        looks, oracle = [], []
        for layer, rows, value in zip(layers, recorder.rows, values):
            value = value[0].float()  # (Hkv, S, hd): one sample, one group
            heads = rows.probabilities.shape[1]
            value = value.repeat_interleave(heads // value.shape[0], dim=0)  # (H, S, hd), head h reads kv head h // rep
            looks.append(torch.einsum("hs,hsd->hd", rows.probabilities[0], value).flatten())  # heads in o_proj's order
            features.setdefault(f"looks, layer {layer.layer_idx}", []).append(looks[-1])
            write = torch.tanh(layer.t2v.gate.float()) * layer.t2v.o_proj(looks[-1].to(layer.t2v.o_proj.weight.dtype)).float()
            features.setdefault(f"T2V write, layer {layer.layer_idx}", []).append(write)
            oracle.append(torch.cat([value[:, first].mean(1), value[:, last].mean(1)], dim=-1).flatten())
        marked = model.mark_originals(model.project_frames(vision), item["media_num_frames"]).flatten(0, 1).float()  # (F*N, D)
        features["looks"].append(torch.cat(looks))
        features["oracle looks"].append(torch.cat(oracle))
        features["oracle originals"].append(torch.cat([marked[first].mean(0), marked[last].mean(0)]))
        for i, residual in enumerate(residuals):
            features.setdefault(f"residual after layer {i}", []).append(residual.flatten(0, 1)[where["flat"]].float())
        labels.append(DIRECTIONS.index(record["answer"]))
    labels_t = torch.tensor(labels)
    train_rows = int(0.8 * len(labels))
    result = {"model": str(args.model), "checkpoint": args.checkpoint, "questions": len(labels),
              "chance (most frequent)": round(Counter(labels[train_rows:]).most_common(1)[0][1] / (len(labels) - train_rows), 3)}
    with torch.enable_grad():  # the probes train
        for name, rows in features.items():
            result[name] = round(probe_accuracy(torch.stack(rows), labels_t, len(DIRECTIONS), train_rows, 300), 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
