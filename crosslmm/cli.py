"""The `crosslmm` command line."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="CrossLMM video language models.")
bench_app = typer.Typer(no_args_is_help=True, help="Cost benchmarks (run by command, never as timed tests).")
app.add_typer(bench_app, name="bench")


def _int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _dtype(name: str | None):
    import torch

    if name is None:
        return None
    if name not in DTYPE_NAMES:
        raise typer.BadParameter(f"dtype must be one of {sorted(DTYPE_NAMES)}")
    return getattr(torch, DTYPE_NAMES[name])


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def version() -> None:
    """Print the versions that matter for reproducing a result."""
    import torch
    import transformers

    import crosslmm

    typer.echo(f"crosslmm {crosslmm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")


@app.command()
def build(
    vision: Path = typer.Option(..., help="Local SigLIP / SigLIP2 / CLIP checkpoint directory."),
    llm: Path = typer.Option(..., help="Local Llama-family LLM checkpoint directory, with its tokenizer."),
    out: Path = typer.Option(..., help="Where the CrossLMM checkpoint is written."),
    tokens_per_frame: int = typer.Option(9, help="Pooled tokens per frame (a square)."),
    every_k: int = typer.Option(4, help="A DCAL after every K-th decoder layer."),
    v2v_scope: str = typer.Option("frame", help="frame or video."),
    t2v: bool = typer.Option(True, help="Build the T2V cross-attentions (stage 1 trains without them)."),
    pooling: str = typer.Option("bilinear", help="bilinear or average."),
    vision_feature_layer: int = typer.Option(-2, help="ViT hidden state that feeds the model."),
    dtype: str = typer.Option(None, help="fp32, bf16 or fp16 (default: the checkpoints' own)."),
) -> None:
    """Assemble an untrained CrossLMM from a local vision encoder and a local LLM."""
    from crosslmm.checkpoints import CheckpointError
    from crosslmm.checkpoints.build import build as build_checkpoint

    try:
        path = build_checkpoint(
            vision, llm, out, _dtype(dtype), tokens_per_frame=tokens_per_frame, dcal_every_k=every_k,
            v2v_scope=v2v_scope, use_t2v=t2v, pooling_mode=pooling, vision_feature_layer=vision_feature_layer,
        )
    except (CheckpointError, ValueError) as err:
        _fail(err)
    typer.echo(f"wrote {path}")


@app.command("init")
def init_model(
    out: Path = typer.Option(..., help="Where the randomly initialised checkpoint is written."),
    preset: str = typer.Option("tiny", help="Model shapes: tiny, small, reduced, crosslmm-2b, crosslmm-7b."),
    corpus: list[Path] = typer.Option(..., help="LLaVA-format record files whose text trains the tokenizer."),
    vocab_size: int = typer.Option(1024, help="BPE vocabulary size (specials included)."),
    seed: int = typer.Option(0, help="Weight initialisation seed."),
    tokens_per_frame: int = typer.Option(0, help="Override the preset's tokens per frame (0: keep)."),
    vision: Path = typer.Option(None, help="A pretrained vision-encoder checkpoint of the preset's shape to start from."),
) -> None:
    """A from-scratch CrossLMM: preset shapes, random weights, a tokenizer trained on your data."""
    from crosslmm.checkpoints.scratch import corpus_from_records, init_from_scratch

    overrides = {"tokens_per_frame": tokens_per_frame} if tokens_per_frame else {}
    try:
        path = init_from_scratch(preset, out, corpus_from_records(corpus), vocab_size, seed, vision=vision, **overrides)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    typer.echo(f"wrote {path}")


@app.command("import-llava-ov")
def import_llava_ov(
    source: Path = typer.Argument(..., help="Local transformers-format LLaVA-OneVision checkpoint."),
    out: Path = typer.Argument(..., help="Where the CrossLMM checkpoint is written."),
    layout: str = typer.Option("llava-ov", help="llava-ov (exact LLaVA-OV computation) or crosslmm (stage-1 start)."),
    tokens_per_frame: int = typer.Option(9, help="Tokens per frame of the crosslmm layout."),
    dtype: str = typer.Option(None, help="fp32, bf16 or fp16 (default: the checkpoint's own)."),
) -> None:
    """Convert a LLaVA-OneVision checkpoint into a CrossLMM checkpoint."""
    from crosslmm.checkpoints import CheckpointError, import_llava_onevision

    try:
        path = import_llava_onevision(source, out, layout=layout, tokens_per_frame=tokens_per_frame, dtype=_dtype(dtype))
    except (CheckpointError, ValueError) as err:
        _fail(err)
    typer.echo(f"wrote {path}")


@app.command()
def ask(
    media: Path = typer.Argument(..., help="A video or image file."),
    question: str = typer.Argument(..., help="The question."),
    model: Path = typer.Option(
        None, help="A CrossLMM checkpoint directory (a trained model or `crosslmm build` output); "
        "default: the bundled synthetic-world model (docs/synthetic.md)."),
    num_frames: int = typer.Option(0, help="Frames to sample (0: the processor's saved setting)."),
    max_new_tokens: int = typer.Option(64, help="Longest answer in tokens."),
    sample: bool = typer.Option(False, help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, help="Sampling temperature."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Ask a question about a video or an image; the answer streams as it is generated."""
    from transformers.utils import logging as hf_logging

    from crosslmm.data.video import VideoDecodeError
    from crosslmm.infer import default_model_dir, load
    from crosslmm.serve.chat import VideoChat

    hf_logging.disable_progress_bar()  # stdout is the answer, nothing else

    try:
        options = {"num_frames": num_frames} if num_frames else {}
        crosslmm_model, processor = load(model or default_model_dir(), device, **options)
        chat = VideoChat(crosslmm_model, processor, [media])
        generation = {"max_new_tokens": max_new_tokens, "do_sample": sample}
        if sample:
            generation["temperature"] = temperature
        started = False
        for piece in chat.ask(question, **generation):
            if not started:
                piece, started = piece.lstrip(), True
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except (FileNotFoundError, VideoDecodeError, ValueError) as err:
        _fail(err)


@app.command()
def chat(
    media: Path = typer.Argument(..., help="A video or image file to talk about."),
    model: Path = typer.Option(None, help="A CrossLMM checkpoint directory; default: the bundled synthetic-world model."),
    frames: int = typer.Option(0, help="Frames to sample (0: the processor's saved setting)."),
    max_new_tokens: int = typer.Option(256, help="Longest answer in tokens."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    timing: bool = typer.Option(False, help="After each answer, print its time to first token and how many prompt "
                                            "tokens came from the caches (to stderr)."),
) -> None:
    """A multi-turn chat about one video in the terminal. The video is decoded and
    encoded once; each turn reuses the conversation's KV and cross-attention caches.
    An empty line or end of input ends it."""
    from transformers.utils import logging as hf_logging

    from crosslmm.data.video import VideoDecodeError
    from crosslmm.infer import default_model_dir, load
    from crosslmm.serve.chat import VideoChat

    hf_logging.disable_progress_bar()
    try:
        options = {"num_frames": frames} if frames else {}
        crosslmm_model, processor = load(model or default_model_dir(), device, **options)
        conversation = VideoChat(crosslmm_model, processor, [media])
    except (FileNotFoundError, VideoDecodeError, ValueError) as err:
        _fail(err)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line.strip():
            break
        if interactive:
            sys.stdout.write("model> ")
        try:
            started = False
            for piece in conversation.ask(line.rstrip("\n"), max_new_tokens=max_new_tokens):
                if not started:
                    piece, started = piece.lstrip(), True
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ValueError as err:  # e.g. the conversation no longer fits the context
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            break
        sys.stdout.write("\n")
        if timing and conversation.last_turn is not None:
            turn = conversation.last_turn
            typer.echo(f"[time to first token {turn.time_to_first_token_s * 1000:.1f} ms, {turn.reused_tokens} of "
                       f"{turn.prompt_tokens} prompt tokens from the caches]", err=True)


@app.command()
def serve(
    model: Path = typer.Option(None, help="A CrossLMM checkpoint directory; default: the bundled synthetic-world model."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default; 0.0.0.0 exposes it)."),
    port: int = typer.Option(8000, help="TCP port."),
    media_root: Path = typer.Option(None, help="Local media files are read only under this folder (none without it)."),
    allow_host: list[str] = typer.Option([], help="An http(s) host media may be fetched from (repeatable; none by default)."),
    frames: int = typer.Option(0, help="Frames per video, the ceiling a request may lower (0: the processor's setting)."),
    served_model_name: str = typer.Option(None, help="The model id of /v1/models (default: the checkpoint folder's name)."),
    max_batch: int = typer.Option(8, help="Requests decoded together."),
    max_queue: int = typer.Option(32, help="Requests waiting; more are answered 503."),
    max_body_mb: float = typer.Option(64, help="Largest request body (MiB)."),
    max_media_mb: float = typer.Option(256, help="Largest media file (MiB)."),
    max_video_seconds: float = typer.Option(3 * 3600, help="Longest video (seconds)."),
    max_tokens: int = typer.Option(1024, help="Ceiling of a request's max_tokens."),
    timeout: float = typer.Option(300, help="Per-request timeout (seconds)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """An OpenAI-compatible chat completions server for video questions (docs/serving.md)."""
    from crosslmm.infer import default_model_dir
    from crosslmm.serve.media import MediaLimits
    from crosslmm.serve.server import ServeSettings, serve as run_server

    model_dir = model or default_model_dir()
    settings = ServeSettings(model_name=served_model_name or model_dir.name, max_body_bytes=int(max_body_mb * 2**20),
                             max_tokens=max_tokens, request_timeout_s=timeout)
    limits = MediaLimits(max_bytes=int(max_media_mb * 2**20), max_seconds=max_video_seconds)
    try:
        run_server(model_dir, host=host, port=port, media_root=media_root, allowed_hosts=tuple(allow_host),
                   frames=frames or None, device=device, max_batch=max_batch, max_queue=max_queue, settings=settings,
                   limits=limits)
    except (FileNotFoundError, ValueError) as err:
        _fail(err)


@app.command("eval")
def eval_benchmark(
    benchmark: str = typer.Argument(..., help="mvbench, perceptiontest, longvideobench, mlvu, videomme, videomme-sub "
                                              "or synthetic."),
    data_root: Path = typer.Option(None, help="The benchmark's local folder (layouts: docs/evaluation.md)."),
    model: Path = typer.Option(None, help="A CrossLMM checkpoint directory; default: the bundled synthetic-world model."),
    frames: int = typer.Option(None, help="Frames per video (default: the processor's saved setting)."),
    limit: int = typer.Option(0, help="Only the first N questions (MVBench: of each task); 0: all."),
    out: Path = typer.Option(None, help="Results JSON (default: results/BENCHMARK.json); a .md table and the "
                                        ".predictions.jsonl go beside it."),
    resume: bool = typer.Option(False, help="Continue an interrupted run: skip the questions already in its predictions."),
    predictions: Path = typer.Option(None, help="Score this predictions file again, without a model."),
    scoring: str = typer.Option("lmms-eval", help="lmms-eval (its v0.3.3 behaviour, quirks included: comparable "
                                                  "with published numbers) or strict (quirks fixed)."),
    batch_size: int = typer.Option(8, help="Questions per forward pass."),
    annotations: Path = typer.Option(None, help="The annotation file, if not where docs/evaluation.md says."),
    seed: int = typer.Option(0, help="Seed of LongVideoBench's random fallback letter (per question)."),
    device: str = typer.Option(None, help="cpu or cuda[:N] (default: cuda:LOCAL_RANK if there is a GPU)."),
) -> None:
    """Score a checkpoint on a video benchmark the way lmms-eval v0.3.3 did. Runs under
    `torchrun --nproc-per-node N -m crosslmm eval ...` (or accelerate launch) data-parallel."""
    from transformers.utils import logging as hf_logging

    from crosslmm.eval import BENCHMARKS, SCORINGS, evaluate_benchmark, score_predictions
    from crosslmm.eval.report import markdown
    from crosslmm.eval.runner import PredictionsExistError
    from crosslmm.infer import default_model_dir

    hf_logging.disable_progress_bar()
    try:
        if benchmark not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
        if scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        if predictions is not None:
            result = score_predictions(benchmark, predictions, out, scoring=scoring, seed=seed)
        else:
            if data_root is None:
                raise ValueError("--data-root is required (or --predictions FILE to score a finished run)")
            result = evaluate_benchmark(benchmark, data_root, model or default_model_dir(), out or Path("results") / f"{benchmark}.json",
                                        frames=frames, limit=limit, resume=resume, batch_size=batch_size, scoring=scoring,
                                        seed=seed, device=device, annotations=annotations)
    except (FileNotFoundError, PredictionsExistError, ValueError, ImportError) as err:
        _fail(err)
    if result is not None:
        typer.echo(markdown(result))
        if predictions is None:
            typer.echo(f"wrote {out or Path('results') / f'{benchmark}.json'} (+ .md) and {result['predictions']}")


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Output folder: videos/, train.json, test.json, meta.json."),
    n: int = typer.Option(..., "--n", help="Number of videos (3 questions each by default)."),
    seed: int = typer.Option(0, help="Everything (scenes, questions, splits) follows from it."),
    frames: int = typer.Option(8, help="Frames per video."),
    size: int = typer.Option(64, help="Frame side in pixels (>= 48)."),
    questions_per_video: int = typer.Option(3, help="Questions asked about each video."),
    mc_reply: str = typer.Option("letter", help="How multiple choice is answered: letter (the letter alone), "
                                                "option-letter (\"up (B)\") or sentence (\"The answer is up (B)\"); "
                                                "docs/synthetic.md."),
) -> None:
    """Generate the synthetic fine-grained video QA world (real mp4 files + LLaVA records)."""
    from crosslmm.synth import write_dataset

    try:
        meta = write_dataset(out, n=n, seed=seed, frames=frames, size=size, questions_per_video=questions_per_video,
                             mc_reply=mc_reply)
    except ValueError as err:
        _fail(err)
    typer.echo(f"wrote {out}: videos {meta['videos']}, questions {meta['questions']} (per-type counts in meta.json)")


@app.command("synth-text")
def synth_text(
    out: Path = typer.Argument(..., help="Output folder: train_text.json and heldout_text.json."),
    n: int = typer.Option(..., "--n", help="Conversations in all (one fresh scene each, never a video's scene)."),
    heldout: int = typer.Option(0, help="How many of them (the last) go to heldout_text.json."),
    seed: int = typer.Option(0, help="The world's seed (use the video dataset's)."),
    questions_per_video: int = typer.Option(6, help="Questions per scene."),
    caption_as_answer: bool = typer.Option(False, help="The caption as the assistant's turn (trains caption writing too)."),
) -> None:
    """The synthetic world as text only, for pretraining the language model before it sees
    pixels (configs/synth/text.yaml): each scene's dense caption, then its questions."""
    import json

    from crosslmm.synth.world import text_world_records

    if not 0 <= heldout < n:
        _fail(ValueError(f"--heldout must be in [0, --n), got {heldout} of {n}"))
    records = text_world_records(seed, n, questions_per_video=questions_per_video, caption_as_answer=caption_as_answer)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_text.json").write_text(json.dumps(records[: n - heldout], indent=1) + "\n")
    (out / "heldout_text.json").write_text(json.dumps(records[n - heldout:], indent=1) + "\n")
    typer.echo(f"wrote {out}: {n - heldout} training and {heldout} held-out conversations")


@app.command("synth-eval")
def synth_eval(
    data: Path = typer.Argument(..., help="A folder written by `crosslmm synth`."),
    model: Path = typer.Option(..., help="A CrossLMM checkpoint directory."),
    split: str = typer.Option("test", help="Which split's questions."),
    limit: int = typer.Option(0, help="Only the first N questions (0: all)."),
    out: Path = typer.Option(None, help="Also write accuracies and predictions as JSON here."),
    captions: bool = typer.Option(False, help="Score caption grounding on the split's videos instead of questions "
                                              "(--limit counts videos)."),
    text: bool = typer.Option(False, help="DATA is a text-world record file (`crosslmm synth-text`): answer its "
                                          "questions from the captions as text (--limit counts conversations)."),
) -> None:
    """Accuracy on the synthetic world's questions, per question type and form; with
    --captions, teacher-forced accuracy on the novel words of the videos' captions with the
    right video and with another video (what the model reads from the pixels)."""
    import json

    from transformers.utils import logging as hf_logging

    from crosslmm.infer import load
    from crosslmm.synth.evaluate import caption_grounding, evaluate, evaluate_text_world, split_scenes

    hf_logging.disable_progress_bar()
    crosslmm_model, processor = load(model)
    try:
        if text:
            records = json.loads(data.read_text())
            result = evaluate_text_world(crosslmm_model, processor, records[:limit] if limit else records)
        elif captions:
            result = caption_grounding(crosslmm_model, processor, split_scenes(data, split, limit), data)
        else:
            records = json.loads((data / f"{split}.json").read_text())
            records = records[:limit] if limit else records
            result = evaluate(crosslmm_model, processor, records, data)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    for key, value in result["accuracy"].items():
        typer.echo(f"{key:>40}: {100 * value:5.1f} %  ({result['count'][key]})")
    if out is not None:
        out.write_text(json.dumps(result, indent=1))


@app.command("synth-vision")
def synth_vision(
    out: Path = typer.Argument(..., help="Output folder: a SiglipVisionModel checkpoint and pretraining.json."),
    world: Path = typer.Option(..., help="A folder written by `crosslmm synth`: its training split's scenes."),
    model: Path = typer.Option(..., help="A CrossLMM checkpoint whose vision encoder training continues."),
    scenes: int = typer.Option(3000, help="Training scenes (the split's first)."),
    heldout: int = typer.Option(100, help="The split's next scenes, which score the report."),
    steps: int = typer.Option(3000, help="Optimizer steps."),
    batch_frames: int = typer.Option(64, help="Frames per step."),
    learning_rate: float = typer.Option(5e-4, help="Peak learning rate (warmup, then cosine)."),
    anchor: float = typer.Option(1.0, help="Weight of the pull toward the starting encoder's features (0: none)."),
    seed: int = typer.Option(0, help="Initialisation of the heads and order of the frames."),
) -> None:
    """Continue the per-patch pretraining of a model's frozen vision encoder on a world's
    training scenes (docs/synthetic.md, "a better-trained encoder"); `crosslmm set-vision`
    puts the result into a model."""
    import json

    from crosslmm.infer import load
    from crosslmm.synth.evaluate import training_scenes
    from crosslmm.synth.vision_pretrain import pretrain_vision

    crosslmm_model, _ = load(model)
    try:
        train_scenes, held_scenes = training_scenes(world, scenes, heldout)
        report = pretrain_vision(crosslmm_model.config, train_scenes, held_scenes, out, steps=steps,
                                 batch_frames=batch_frames, learning_rate=learning_rate, seed=seed,
                                 init=crosslmm_model.vision_tower, anchor=anchor)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    report.update(init=str(model), world=str(world))
    (out / "pretraining.json").write_text(json.dumps(report, indent=2))
    typer.echo(json.dumps(report["eval_patch_accuracy"]))


@app.command("set-vision")
def set_vision(
    model: Path = typer.Argument(..., help="A CrossLMM checkpoint directory."),
    encoder: Path = typer.Argument(..., help="A vision-encoder checkpoint of the model's tower shape."),
    out: Path = typer.Argument(..., help="Where the model with the new encoder is written."),
) -> None:
    """Write MODEL with its vision tower's weights taken from ENCODER (everything else,
    processor included, unchanged). Feature caches of the old encoder are refused by
    their fingerprint, so training encodes its videos again."""
    import json
    import shutil

    from crosslmm.checkpoints.scratch import load_vision_weights
    from crosslmm.model.modeling import CrossLMMForCausalLM
    from crosslmm.data.processor import CrossLMMProcessor

    crosslmm_model = CrossLMMForCausalLM.from_pretrained(model, local_files_only=True, dtype="auto")  # kept in its dtype
    processor = CrossLMMProcessor.from_pretrained(model, config=crosslmm_model.config)
    try:
        load_vision_weights(crosslmm_model, encoder)
    except (ValueError, OSError) as err:
        _fail(err)
    crosslmm_model.save_pretrained(out)
    processor.save_pretrained(out)
    if (encoder / "pretraining.json").exists():
        shutil.copy(encoder / "pretraining.json", out / "vision_pretraining.json")
    (out / "set_vision.json").write_text(json.dumps({"model": str(model), "encoder": str(encoder)}, indent=2))
    typer.echo(f"wrote {out}")


@app.command("synth-ablations", context_settings={"allow_extra_args": True})
def synth_ablations(
    ctx: typer.Context,
    config: Path = typer.Argument(Path("configs/synth/ablations.yaml"), help="The ablation YAML."),
    only: str = typer.Option("", help="Comma-separated variant names (default: all)."),
) -> None:
    """Train and score the ablation variants on the synthetic world; writes a table and a plot.
    Extra `key=value` arguments override the YAML (e.g. out_dir=runs/x jobs=1)."""
    from crosslmm.synth.ablations import load_ablation_config, run_ablations

    try:
        summary = run_ablations(load_ablation_config(config, list(ctx.args)),
                                [n for n in only.split(",") if n] or None)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    out = Path(summary["config"]["out_dir"])
    typer.echo((out / "results.md").read_text())
    typer.echo(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'ablations.png'}")


@app.command("synth-default", context_settings={"allow_extra_args": True})
def synth_default(
    ctx: typer.Context,
    config: Path = typer.Argument(Path("configs/synth/default.yaml"), help="The default model's recipe YAML."),
) -> None:
    """Train a default model from scratch in one resumable run (issue 12's 2-hour
    recipe): worlds, vision encoder, model, stages, export. Extra `key=value` arguments override the YAML."""
    from crosslmm.synth.default_recipe import load_default_recipe, run_default_recipe

    try:
        command = " ".join(["crosslmm synth-default", str(config), *ctx.args])
        model = run_default_recipe(load_default_recipe(config, list(ctx.args)), command=command)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    typer.echo(f"trained {model}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo"), help="Folder for demo.mp4 and demo.png."),
    model: Path = typer.Option(None, help="A CrossLMM checkpoint directory (default: the bundled model)."),
    seed: int = typer.Option(0, help="Which fresh scene to generate."),
    questions: int = typer.Option(6, help="How many questions to ask."),
    mc_reply: str = typer.Option(None, help="Multiple-choice style: letter, option-letter or sentence (default: the one "
                                            "the model's training.json names, else letter)."),
) -> None:
    """Generate a video, ask it questions, compare with the truth, and draw where T2V looked."""
    from transformers.utils import logging as hf_logging

    from crosslmm.infer import default_model_dir
    from crosslmm.synth.demo import run_demo

    hf_logging.disable_progress_bar()
    try:
        run_demo(model or default_model_dir(), out, seed=seed, num_questions=questions, mc_reply=mc_reply)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)


@app.command(context_settings={"allow_extra_args": True})
def train(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="A training recipe YAML (configs/stage1.yaml, configs/stage2.yaml)."),
    stop_after: int = typer.Option(0, help="Stop after this many optimizer steps (after a checkpoint); the schedule is unchanged."),
) -> None:
    """Train a stage; `key=value` arguments override the recipe (e.g. optim.learning_rate=1e-4 resume=latest).
    Multi-process: `torchrun --nproc_per_node N -m crosslmm train RECIPE` or `accelerate launch -m crosslmm train RECIPE`."""
    import logging

    from crosslmm.train.config import load_train_config
    from crosslmm.train.trainer import TrainingDataError
    from crosslmm.train.trainer import train as run_training

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = load_train_config(recipe, ctx.args)
    except ValueError as err:
        _fail(err)
    try:
        final = run_training(config, stop_after=stop_after or None)
    except TrainingDataError as err:
        _fail(err)
    typer.echo(f"model: {final}")


@app.command()
def params(
    model: str = typer.Argument(..., help="A preset (crosslmm-2b, crosslmm-7b, reduced, tiny) or a checkpoint directory."),
    stage: int = typer.Option(1, help="1: projector + V2V trainable; 2: everything, T2V on."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Parameter counts per component and the stage's trainable total (no weights loaded)."""
    import json

    from crosslmm.checkpoints import CheckpointError
    from crosslmm.checkpoints.params import count_parameters, describe, load_config

    try:
        result = count_parameters(load_config(model), stage)
    except (CheckpointError, ValueError) as err:
        _fail(err)
    typer.echo(json.dumps({"model": model, **result}, indent=2) if as_json else describe(result, model))


@app.command()
def memory(
    model: str = typer.Argument(..., help="A preset (crosslmm-2b, crosslmm-7b, reduced, small, tiny) or a checkpoint directory."),
    stage: int = typer.Option(2, help="1: projector + V2V trainable (frozen ViT and LLM); 2: everything, T2V on."),
    frames: int = typer.Option(64, help="Frames per video (one video per sample)."),
    gpus: int = typer.Option(8, help="GPUs the run shards or replicates over."),
    strategy: str = typer.Option("fsdp", help="ddp (a full copy per GPU) or fsdp (FSDP2: weights, gradients, AdamW sharded)."),
    batch: int = typer.Option(1, help="Per-GPU micro-batch (samples)."),
    text_tokens: int = typer.Option(128, help="Text tokens per sample around the video."),
    answer_tokens: int = typer.Option(32, help="Labelled (answer) tokens per sample."),
    mixed_precision: str = typer.Option("bf16", help="bf16 or no (fp32 compute)."),
    measure: bool = typer.Option(False, help="Also run one real training step of this model on this machine's CPU (one "
                                             "process; small presets) and print the measured peak beside the estimate."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (per_gpu_gb is the total)."),
) -> None:
    """Per-GPU training memory of a recipe before renting the GPUs: model states and activations by part."""
    import json

    from crosslmm.bench.memory import describe_estimate, estimate, measure_training_step
    from crosslmm.checkpoints import CheckpointError
    from crosslmm.checkpoints.params import load_config

    if strategy == "zero3":
        _fail(ValueError("DeepSpeed ZeRO-3 is not shipped: --strategy fsdp shards the same states (FSDP2, ZeRO-3 semantics)"))
    try:
        config = load_config(model)
        if measure:
            gpus, strategy = 1, "ddp"  # what one CPU process runs
        result = estimate(config, stage, frames, gpus, strategy, batch, text_tokens, answer_tokens, mixed_precision,
                          device="cpu" if measure else "cuda")
        if measure:
            measured = measure_training_step(config, stage, frames, batch, text_tokens, answer_tokens,
                                             mixed_precision=mixed_precision)
            result["measured_peak_gb"] = measured["peak_gb"]
            result["estimate_error"] = result["per_gpu_gb"] / measured["peak_gb"] - 1
    except (CheckpointError, ValueError) as err:
        _fail(err)
    typer.echo(json.dumps({"model": model, **result}, indent=2) if as_json else describe_estimate(result, model))


@bench_app.command("efficiency")
def bench_efficiency(
    preset: str = typer.Option("reduced", help="Model shapes: crosslmm-2b, crosslmm-7b, reduced, tiny."),
    frames: str = typer.Option("16,64", help="Comma-separated frame counts."),
    tokens_per_frame: str = typer.Option("9", help="Comma-separated CrossLMM tokens per frame."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("fp32", help="fp32, bf16 or fp16."),
    repeats: int = typer.Option(3, help="Timed prefill repeats after one warm-up (the median is reported)."),
    decode_tokens: int = typer.Option(8, help="Decode steps timed after the prefill."),
    language_only: bool = typer.Option(False, help="Give the LLM precomputed vision features: time the language side only."),
    threads: int = typer.Option(0, help="OMP threads per measurement (0: torch's default)."),
    peer: bool = typer.Option(True, help="Also run transformers' LlavaOnevisionForConditionalGeneration (end to end)."),
    out: Path = typer.Option(Path("bench-out/efficiency"), help="Where results.json and results.md go."),
) -> None:
    """CrossLMM vs LLaVA-OneVision (its layout on our code path, and transformers' own model):
    prefill/decode time, peak memory, FLOPs per component; writes JSON, Markdown and a Fig. 4 plot."""
    from crosslmm.bench.efficiency import run

    run(
        preset, _int_list(frames), _int_list(tokens_per_frame), device, dtype, repeats, decode_tokens,
        language_only, out, threads or None, command=shlex.join(["crosslmm", *sys.argv[1:]]), peer=peer,
    )
    typer.echo((out / "results.md").read_text())


@bench_app.command("flops")
def bench_flops(
    preset: str = typer.Option("crosslmm-2b", help="Model shapes: crosslmm-2b, crosslmm-7b, reduced, small, tiny."),
    frames: str = typer.Option("32,64,128,256", help="Comma-separated frame counts."),
    tokens_per_frame: str = typer.Option("9", help="Comma-separated CrossLMM tokens per frame (1, 9, 16, ...)."),
    all_logits: bool = typer.Option(False, help="Apply the LM head at every position, as a plain forward does (default: the last)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON rows instead of the table."),
) -> None:
    """FLOPs and MACs of one prefill per component at a preset's real shapes, for CrossLMM and
    LLaVA-OneVision's computation on the same ViT and LLM; counted on the meta device (no
    weights, no activations), so the 7B shapes take seconds."""
    import json

    from crosslmm.bench.flops import flops_rows, flops_table

    try:
        rows = flops_rows(preset, _int_list(frames), _int_list(tokens_per_frame), all_logits)
    except ValueError as err:
        _fail(err)
    typer.echo(json.dumps(rows, indent=2) if as_json else flops_table(preset, rows))


@bench_app.command("gqa-layout")
def bench_gqa_layout(
    frames: int = typer.Option(64, help="Frames whose 729 original tokens are the keys."),
    queries: int = typer.Option(128, help="Text queries."),
) -> None:
    """Time three ways of running grouped-query cross-attention (CrossLMM-2B head shapes)."""
    from crosslmm.bench.gqa import time_layouts

    for name, ms in time_layouts(queries=queries, frames=frames).items():
        typer.echo(f"{name:>26}: {ms:8.1f} ms")


if __name__ == "__main__":
    app()


@bench_app.command("serve")
def bench_serve(
    video: list[Path] = typer.Option(..., help="A video to ask about (repeatable; requests cycle through them)."),
    model: Path = typer.Option(None, help="Start a loopback server for this checkpoint (default: the bundled model)."),
    url: str = typer.Option(None, help="Or load a running server at this loopback URL (its media root must hold the videos)."),
    clients: str = typer.Option("1,4,8", help="Comma-separated numbers of concurrent clients."),
    requests: int = typer.Option(32, help="At most this many requests per client count."),
    seconds: float = typer.Option(60, help="At most this long per client count."),
    max_tokens: int = typer.Option(16, help="max_tokens of every request."),
    question: str = typer.Option("What happens in the video? Answer the question using a single word.", help="The question."),
    inline: bool = typer.Option(False, help="Send the videos as base64 data: URLs instead of paths."),
    max_batch: int = typer.Option(8, help="The started server's batch size."),
    frames: int = typer.Option(0, help="The started server's frames per video (0: the processor's setting)."),
    out: Path = typer.Option(None, help="Also write the rows as JSON here."),
) -> None:
    """Load test of `crosslmm serve` with streaming clients (loopback only): requests/s and
    percentiles of time to first token and total latency."""
    import json

    from crosslmm.bench.serving import load_test
    from crosslmm.infer import default_model_dir

    try:
        rows = load_test(model_dir=None if url else (model or default_model_dir()), url=url, videos=video,
                         question=question, clients=_int_list(clients), max_requests=requests, max_seconds=seconds,
                         max_tokens=max_tokens, inline=inline, max_batch=max_batch, frames=frames or None)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    if rows and rows[0]["video_cache"]:
        typer.echo("| video | first question ms | second question ms (encoded-video cache hit) |")
        typer.echo("|---|---|---|")
        for row in rows[0]["video_cache"]:
            typer.echo(f"| {row['video']} | {row['first_ms']:.0f} | {row['cache_hit_ms']:.0f} |")
        typer.echo("")
    typer.echo("| clients | requests | errors | requests/s | TTFT p50 / p90 / p99 ms | total p50 / p90 / p99 ms |")
    typer.echo("|---|---|---|---|---|---|")
    for row in rows:
        t, w = row["ttft_ms"], row["total_ms"]
        typer.echo(f"| {row['clients']} | {row['requests']} | {row['errors']} | {row['requests_per_s']:.2f} | "
                   f"{t['p50']:.0f} / {t['p90']:.0f} / {t['p99']:.0f} | {w['p50']:.0f} / {w['p90']:.0f} / {w['p99']:.0f} |")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": shlex.join(["crosslmm", *sys.argv[1:]]), "rows": rows}, indent=2) + "\n")


@bench_app.command("chat")
def bench_chat(
    video: Path = typer.Argument(..., help="The video of the conversation."),
    model: Path = typer.Option(None, help="A CrossLMM checkpoint directory (default: the bundled model)."),
    frames: int = typer.Option(0, help="Frames to sample (0: the processor's setting)."),
    turns: int = typer.Option(3, help="Questions in the conversation."),
    repeats: int = typer.Option(3, help="Conversations timed (medians reported)."),
) -> None:
    """Time to first token per turn of `crosslmm chat` (caches reused) against the same
    turn as a fresh request."""
    from crosslmm.bench.serving import chat_turns
    from crosslmm.infer import default_model_dir

    questions = ["What happens in the video?", "What colour is the first object?", "Which direction does it move?",
                 "How many objects are there?", "What is in the last frame?"]
    questions = [questions[i % len(questions)] for i in range(turns)]
    result = chat_turns(model or default_model_dir(), video, questions, frames=frames or None, repeats=repeats)
    typer.echo(f"{result['frames']} frames, {result['tokens_per_frame']} tokens per frame")
    typer.echo("| turn | prompt tokens | from the caches | TTFT ms (chat) | TTFT ms (fresh request) |")
    typer.echo("|---|---|---|---|---|")
    for row in result["turns"]:
        typer.echo(f"| {row['turn']} | {row['prompt_tokens']} | {row['reused_tokens']} | {row['ttft_ms']:.1f} | "
                   f"{row['fresh_ttft_ms']:.1f} |")
