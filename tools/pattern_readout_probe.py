"""Does the query that answers "What pattern does the X have?" hold the pattern? Linear probes on it.

The from-scratch models answer this kind of question about half the time, although their
originals carry a patch's pattern (95 %) and T2V puts most of its attention on the named
sprite (docs/synthetic.md, thirteenth session). For the first N short-answer questions of
that kind in a synthetic world's `test.json` (`--split train`: its training records), the residual stream of the token that
predicts the answer after each decoder layer, and a linear classifier per layer for the
true pattern (four, chance about 25 %), fitted on the first 70 % and scored on the rest
(`query_quadrant_probe.fit_and_score`). A layer after a T2V block where the probe reads
the pattern well, while the model's reply does not, says the language model does not use
what T2V brought; a probe at chance everywhere says the read itself loses it.

    python tools/pattern_readout_probe.py MODEL CHECKPOINT|- DATA_ROOT N [--split train]
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from probe_model import answer_query_states, load_probed, parser
from query_quadrant_probe import fit_and_score

PATTERNS = ["plain", "checks", "dots", "stripes"]


def split_parser(doc: str):
    """The probe tools' command line plus `--split`."""
    cli = parser(doc)
    cli.add_argument("--split", default="test", help="test (held-out videos) or train: more questions, same read")
    return cli


def named_pattern_questions(records_root: Path, split: str) -> Iterator[dict]:
    """The short-answer "What pattern does the X have?" records of a world's split, in order."""
    for record in json.loads((records_root / f"{split}.json").read_text()):
        if record["form"] == "short" and record["conversations"][0]["value"].startswith("<video>\nWhat pattern"):
            yield record


@torch.no_grad()
def main() -> None:
    args = split_parser(__doc__).parse_args()
    model, processor = load_probed(args)
    states, truth, said = [], [], []
    answer_ids = [processor.tokenizer.encode(p, add_special_tokens=False)[0] for p in PATTERNS]
    for record in named_pattern_questions(args.records, args.split):
        if len(states) == args.n:
            break
        item = processor.encode_record(record, args.records)
        layer_states, logits = answer_query_states(model, item)
        states.append(layer_states)  # (layers, D)
        truth.append(PATTERNS.index(record["answer"]))
        said.append(int(logits[answer_ids].argmax()))
    x, y = torch.stack(states).float(), torch.tensor(truth)
    cut = int(len(y) * 0.7)
    print(json.dumps({
        "model": str(args.model), "checkpoint": args.checkpoint, "split": args.split, "questions": len(states),
        "majority class, held-out part": round(float((y[cut:] == y[:cut].mode().values).float().mean()), 3),
        "the model's own pick among the four words, held-out part": round(float((torch.tensor(said)[cut:] == y[cut:]).float().mean()), 3),
        "pattern accuracy after each decoder layer": [round(fit_and_score(x[:, i], y, len(PATTERNS)), 3) for i in range(x.shape[1])],
        "decoder layers holding a DCAL (0-based)": [i for i, layer in enumerate(model.decoder_layers) if getattr(layer, "t2v", None) is not None],
    }, indent=1))


if __name__ == "__main__":
    main()
