"""`crosslmm demo`: ask a model about one fresh synthetic video and show where it looked.

Why: accuracy numbers say *whether* a model answers the synthetic world's questions, not
*how*. CrossLMM's text tokens read the unpooled patch tokens through the text-to-video
(T2V) cross-attention of its DCAL layers; a model that really uses them should look at
the quadrant and frame a question names, or at the sprite it asks about. The demo is a
quick sanity check on a scene no training set holds:

1. one scene of the procedural world (`DEMO_INDEX`, far beyond any dataset's indices) is
   rendered to `out_dir/demo.mp4` and a handful of questions are drawn about it, one
   per question family where the scene allows, alternating multiple-choice and
   one-word forms;
2. the model answers each greedily; a table shows question, answer, truth and whether
   it is correct, scored exactly like `crosslmm.synth.evaluate`;
3. `out_dir/demo.png` shows, per question, the frames the model saw with a heatmap of
   the T2V attention of the positions that predict the answer's tokens (the last prompt
   token and every answer token but the last), averaged over heads and DCAL layers.
   Each row's colour scale spans its whole video, so the picture shows *which frame*
   as well as *where*.

A model without T2V (`use_t2v=False`) still answers; the picture is skipped with a
message, since there is no text-to-video attention to show.

The attention is recomputed, not read out: `GatedCrossAttention` runs SDPA, which never
materialises probabilities. `t2v_attention` runs one forward pass under
`crosslmm.model.t2v_probe.T2VAttentionRecorder`, which redoes the softmax (same
projections, scale and mask) for the requested query rows only; the grounding loss
records through the same code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crosslmm.data.processor import CrossLMMProcessor
from crosslmm.data.video import VideoClip, load_media
from crosslmm.infer import generate_answer, load
from crosslmm.model.modeling import CrossLMMForCausalLM
from crosslmm.model.t2v_probe import T2VAttentionRecorder, t2v_layers
from crosslmm.synth.evaluate import ANSWER_TOKENS, is_correct
from crosslmm.synth.world import (
    FAMILIES,
    FORMS,
    MC_REPLIES,
    MC_SUFFIXES,
    SHORT_SUFFIX,
    Balancer,
    Scene,
    answer_text,
    encode_video,
    make_questions,
    render,
    scene_for,
)

# Video index of the demo scene: write_dataset uses indices 0..n-1, so no training set
# of any realistic size contains this scene, whatever its seed.
DEMO_INDEX = 1_000_000_000
MAX_NEW_TOKENS = ANSWER_TOKENS  # as crosslmm.synth.evaluate


# --------------------------------------------------------------------------- questions


def demo_questions(scene: Scene, seed: int, count: int, mc_reply: str = "letter") -> list[dict]:
    """Up to `count` records about `scene`: families spread first (one per family while
    the scene answers enough of them), forms alternating mc / short by family order;
    multiple choice asked in `mc_reply` style (crosslmm.synth.world.MC_REPLIES)."""
    balancer = Balancer()
    for i, family in enumerate(FAMILIES):  # mark one form as used: the other is picked first
        balancer.forms[family, FORMS[i % 2]] += 1
    rng = np.random.default_rng([seed, 1, DEMO_INDEX])
    records = make_questions(scene, rng, count, balancer, mc_reply)
    return [{"id": f"demo_q{j}", "video": "demo.mp4", **record} for j, record in enumerate(records)]


def one_line(record: dict) -> str:
    """The question without placeholder and answer instruction, options on the same line."""
    text = record["conversations"][0]["value"].replace("<video>", "")
    lines = [line.strip() for line in text.splitlines() if line.strip() not in ("", SHORT_SUFFIX, *MC_SUFFIXES.values())]
    return " ".join(lines)


def truth_text(record: dict) -> str:
    """"B (red)" for multiple choice, the word itself for short answers."""
    if record["form"] == "mc":
        return f"{record['answer']} ({answer_text(record)})"
    return record["answer"]


def model_mc_reply(model_dir: str | Path) -> str:
    """How the model answers multiple choice: the style of the world its card says it
    was scored on (`training.json`, written by `crosslmm.synth.ablations.export_model`);
    "letter" for a model without one."""
    card = Path(model_dir) / "training.json"
    if not card.is_file():
        return "letter"
    world = (json.loads(card.read_text()).get("held_out_data") or {}).get("world") or {}
    style = world.get("mc_reply", "letter")
    if style not in MC_REPLIES:
        raise ValueError(f"{card}: unknown mc_reply {style!r}; expected one of {MC_REPLIES}")
    return style


# --------------------------------------------------------------------------- attention


@torch.no_grad()
def t2v_attention(model: CrossLMMForCausalLM, inputs: dict[str, Any], positions: Sequence[int]) -> torch.Tensor:
    """Where the T2V cross-attention of the text tokens at `positions` (indices into
    `inputs["input_ids"][0]`) looked: (frames, grid, grid) float32, summing to 1 (with an
    attention sink, to one minus the share the sink took: looking at nothing is shown as such).

    One forward pass over `inputs` (a batch of one, as the processor builds it), recorded
    by `T2VAttentionRecorder` (the grounding loss reads the same softmax). Averaged over
    those rows, all heads and all DCAL layers with T2V. Raises ValueError without T2V."""
    if not t2v_layers(model):
        raise ValueError("this model has no T2V cross-attention (use_t2v=False): there is no attention to show")
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError(f"t2v_attention takes a batch of one, got {inputs['input_ids'].shape[0]} rows")
    if inputs.get("media_num_frames") is None or not len(inputs["media_num_frames"]):
        raise ValueError("t2v_attention needs media in the inputs")
    placeholder = inputs["input_ids"][0] == model.config.media_token_id  # (L,)
    media_before = torch.cumsum(placeholder, 0)  # (L,) placeholders up to each position
    for p in positions:
        if bool(placeholder[p]):
            raise ValueError(f"position {p} is a media placeholder, not a text token")
    queries = [(0, p - int(media_before[p])) for p in positions]  # T2V queries are the text tokens in order
    with T2VAttentionRecorder(model, queries) as recorder:
        model(**inputs, use_cache=False, logits_to_keep=1)
    for rows in recorder.rows:
        if len(rows.queries) != len(queries) or bool((rows.visible_frames == 0).any()):
            late = [positions[q] for q, seen in zip(rows.queries, rows.visible_frames.tolist()) if seen == 0]
            raise ValueError(f"position {(late or positions)[0]} is not a text token after the media")
    if not recorder.rows:
        raise ValueError("no T2V cross-attention ran: the inputs hold no media the text could attend to")
    tokens = recorder.rows[0].originals_per_frame
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"{tokens} original tokens per frame do not form a square patch grid")
    mean = torch.stack([rows.probabilities.mean(dim=(0, 1)) for rows in recorder.rows]).mean(dim=0)  # (S,)
    return mean.view(recorder.rows[0].frame_slots, grid, grid)  # frame-major, row-major


# --------------------------------------------------------------------------- asking


@torch.no_grad()
def ask(model: CrossLMMForCausalLM, processor: CrossLMMProcessor, record: dict, clip: VideoClip, *, max_new_tokens: int = MAX_NEW_TOKENS,
        with_attention: bool = True) -> tuple[str, torch.Tensor | None]:
    """The model's greedy answer to a record's question about `clip`, and the T2V
    attention (frames, grid, grid) of the positions that predict the answer's tokens
    (None when `with_attention` is False).

    The generated token ids (not a re-tokenised answer text) feed the attention pass."""
    prediction, inputs, generated = generate_answer(model, processor, record["conversations"][0]["value"], [clip],
                                                    max_new_tokens=max_new_tokens)  # generated: (new,)
    prompt_length = inputs["input_ids"].shape[1]
    device = generated.device
    if not with_attention:
        return prediction, None

    # Answer tokens: what was generated before the first special token (end of turn, pad).
    special = torch.tensor(processor.tokenizer.all_special_ids, device=device)
    stops = torch.isin(generated, special).nonzero()
    answer_ids = generated[: int(stops[0, 0]) if len(stops) else len(generated)]  # (n,)
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], answer_ids[None]], dim=1)  # (1, L + n)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    # Position i predicts token i + 1: the last prompt token and all answer tokens but the
    # last predict the answer; an empty answer falls back to the position predicting EOS.
    positions = range(prompt_length - 1, prompt_length - 1 + max(1, len(answer_ids)))
    return prediction, t2v_attention(model, full, list(positions))


# --------------------------------------------------------------------------- output


def format_table(results: Sequence[dict]) -> str:
    """A plain-text table: question, model answer, truth, correct."""
    header = ("question", "model", "truth", "ok")
    rows = [(r["question"], repr(r["prediction"]), r["truth"], "yes" if r["correct"] else "no") for r in results]
    widths = [min(max(len(row[i]) for row in [header, *rows]), 90 if i == 0 else 24) for i in range(4)]

    def line(row: Sequence[str]) -> str:
        cells = [cell if len(cell) <= w else cell[: w - 3] + "..." for cell, w in zip(row, widths)]
        return "  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip()

    correct = sum(r["correct"] for r in results)
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows),
                      f"{correct}/{len(results)} correct"])


def save_figure(clip: VideoClip, results: Sequence[dict], attention: Sequence[torch.Tensor], path: str | Path) -> None:
    """One row per question, one column per frame the model saw; each frame overlaid
    with its T2V heatmap, the colour scale of a row spanning its whole video."""
    from matplotlib.figure import Figure  # renders with Agg, no pyplot state

    num_frames = clip.num_frames
    height, width = clip.frames.shape[1:3]
    fig = Figure(figsize=(1.5 * num_frames, 1.9 * len(results) + 0.9), layout="constrained")
    fig.suptitle(
        "Where the text-to-video cross-attention looked while answering\n"
        "(positions predicting the answer, mean over heads and T2V layers; "
        "colour scale per row from 0 to its peak over the whole video: brighter = more attention;\n"
        "peak = the highest patch's weight relative to flat attention, 1.00x = the model looks everywhere equally)",
        fontsize=10,
    )
    rows = fig.subfigures(len(results), 1, squeeze=False)[:, 0]
    for row, result, heat in zip(rows, results, attention):
        heat = heat.numpy()  # (frames, grid, grid), sums to 1
        peak = float(heat.max()) * heat.size  # 1.0 = flat attention
        verdict = "correct" if result["correct"] else "wrong"
        row.suptitle(f"{_shorten(result['question'], 120)}\nmodel: {result['prediction']!r}   "
                     f"truth: {result['truth']}   ({verdict})   peak {peak:.2f}x uniform", fontsize=8)
        axes = row.subplots(1, num_frames, squeeze=False)[0]
        for t, ax in enumerate(axes):
            ax.imshow(clip.frames[t], extent=(0, width, height, 0))
            # The patch grid covers the whole frame (square resize), one cell per patch.
            ax.imshow(heat[t], extent=(0, width, height, 0), cmap="inferno", alpha=0.55, vmin=0.0,
                      vmax=float(heat.max()) or 1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"frame {t + 1}", fontsize=7)
    fig.savefig(path, dpi=100)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- the demo


def run_demo(
    model_dir: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    num_questions: int = 6,
    *,
    device: str = "cpu",
    max_new_tokens: int = MAX_NEW_TOKENS,
    echo: bool = True,
    mc_reply: str | None = None,
) -> dict:
    """Write `out_dir/demo.mp4`, answer `num_questions` questions about it with the model
    in `model_dir`, print the table (unless `echo` is False) and, when the model has
    T2V, write `out_dir/demo.png`. Multiple choice is asked the way the model was trained
    to answer it (`mc_reply`; default: `model_mc_reply`).

    Returns {"video": path, "figure": path or None, "note": why there is no figure or
    None, "results": one dict per question (id, type, form, question, prediction,
    answer, truth, correct), "attention": (frames, grid, grid) tensors or None,
    "accuracy": fraction correct}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scene = scene_for(seed, DEMO_INDEX)
    video = out_dir / "demo.mp4"
    encode_video(render(scene), video)
    records = demo_questions(scene, seed, num_questions, mc_reply or model_mc_reply(model_dir))

    model, processor = load(model_dir, device)
    clip = load_media(video, **processor.sampling)  # the frames the model sees, decoded once
    with_attention = bool(t2v_layers(model))
    results, attention = [], []
    for record in records:
        prediction, heat = ask(model, processor, record, clip, max_new_tokens=max_new_tokens,
                               with_attention=with_attention)
        results.append({"id": record["id"], "type": record["type"], "form": record["form"],
                        "question": one_line(record), "prediction": prediction, "answer": record["answer"],
                        "truth": truth_text(record), "correct": is_correct(prediction, record)})
        attention.append(heat)

    figure, note = None, None
    if with_attention:
        figure = out_dir / "demo.png"
        save_figure(clip, results, attention, figure)
    else:
        note = "the model has no T2V cross-attention (use_t2v=False): answers only, no attention picture"
    if echo:
        print(format_table(results))
        print(f"video: {video}")
        print(f"attention picture: {figure}" if figure else f"no picture: {note}")
    return {
        "video": str(video), "figure": str(figure) if figure else None, "note": note, "results": results,
        "attention": attention, "accuracy": sum(r["correct"] for r in results) / max(1, len(results)),
    }
