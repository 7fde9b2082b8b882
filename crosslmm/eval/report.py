"""Writing a benchmark's results: the JSON file (its `overall` in percent), a Markdown
table beside it, and the same table on the terminal, with the paper's figure beside ours
when the checkpoint has a paper model's shape."""

from __future__ import annotations

import json
import os
from pathlib import Path

from crosslmm.eval.scoring import PAPER_RESULTS


def paper_model(config) -> str | None:
    """"crosslmm-2b" or "crosslmm-7b" when `config` (a CrossLMMConfig) has that preset's
    language and vision shapes, else None."""
    from crosslmm.presets import PRESETS

    text, vision = config.text_config, config.vision_config
    for name in PAPER_RESULTS:
        vision_shape, text_shape = PRESETS[name]
        if (text.hidden_size, text.num_hidden_layers) == (text_shape["hidden_size"], text_shape["num_hidden_layers"]) \
                and vision.hidden_size == vision_shape["hidden_size"]:
            return name
    return None


def markdown(result: dict) -> str:
    """The results as Markdown: the headline with its counts, then every breakdown."""
    paper = result.get("paper")
    head = f"**{result['benchmark']}** ({result['scoring']} scoring): **{result['overall']:.1f}**"
    if paper:
        head += f" (paper, {paper['model']}: {paper['overall']:.1f})"
    lines = [head, "",
             f"{result['overall_definition']}; {result['questions']} questions: {result['answered']} answered, "
             f"{result['failed']} failed, {result['skipped']} skipped (failed and skipped count as wrong)."]
    if "model" in result:
        lines.append(f"Model: `{result['model']['path']}`, {result['model']['frames']} frames, "
                     f"{result['model']['tokens_per_frame']} tokens per frame.")
    for key, cells in result["breakdown"].items():
        lines += ["", f"| {key} | accuracy | questions |", "|---|---|---|"]
        lines += [f"| {value} | {cell['accuracy']:.1f} | {cell['count']} |" for value, cell in cells.items()]
    return "\n".join(lines) + "\n"


def write_results(result: dict, path: str | Path) -> tuple[Path, Path]:
    """`path` (JSON) and its Markdown twin (.md), each written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    md = path.with_suffix(".md")
    for target, text in ((path, json.dumps(result, indent=2) + "\n"), (md, markdown(result))):
        temporary = target.with_name(target.name + ".tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, target)
    return path, md
