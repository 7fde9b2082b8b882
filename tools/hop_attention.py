"""Where does the option-letter hop look? Attention of a text hop model, per layer and head.

The stated hop ("The answer is up." before a multiple-choice question, reply "up (B)")
is learned by the small language model, the unstated copy (the reply's own "up" to its
letter) is not (docs/synthetic.md). One explanation: with the answer stated before the
options, each option's tokens can see whether they repeat it (a duplicate-token match,
looking back) and be marked, and the letter is then read from the one marked line, a
lookup that does not depend on which word the answer is. Without a statement an option
cannot see the answer, which is only written after it, so the reply must search the
options for its own word. This measures both halves on teacher-forced hop records:

- `mark`: attention from each option's first text token to the stated answer's tokens,
  for the right option and for the others (a mark shows as right >> others);
- `read`: attention from the position that predicts the letter to each option line, the
  right one against the mean of the others.

For each it prints the head with the largest right-minus-others difference per layer.

    python tools/hop_attention.py MODEL CHECKPOINT|- RECORDS.json N
"""
from __future__ import annotations

import json

import torch

from crosslmm.synth.world import LETTERS, LETTER_HOP_PREFIX
from probe_model import load_probed, parser


def _char_starts(tokenizer, ids: list[int]) -> list[int]:
    """Character offset in the decoded text where each token starts (byte-level BPE)."""
    return [len(tokenizer.decode(ids[:i])) for i in range(len(ids) + 1)]


def _tokens_in(starts: list[int], begin: int, end: int) -> list[int]:
    """Token indices whose text starts inside [begin, end)."""
    return [i for i in range(len(starts) - 1) if begin <= starts[i] < end]


@torch.no_grad()
def measure(model, processor, record: dict) -> dict | None:
    example = processor.encode_record(record, ".")
    ids, labels = example["input_ids"].tolist(), example["labels"]
    letter_ids = [processor.tokenizer.convert_tokens_to_ids(x) for x in LETTERS]
    predicts = next(i for i in range(len(labels)) if int(labels[i]) in letter_ids) - 1
    text = processor.tokenizer.decode(ids)
    starts = _char_starts(processor.tokenizer, ids)
    answer_letter = record["questions"][0]["answer"]
    prompt = record["conversations"][0]["value"]
    prompt_at = text.index(prompt)
    lines, offset = {}, prompt_at
    for line in prompt.split("\n"):
        if line[:3] in {f"{x}. " for x in LETTERS}:
            lines[line[0]] = (offset, offset + len(line) + 1, offset + 3)  # line span, text start
        offset += len(line) + 1
    if set(lines) != set(LETTERS) or not prompt.startswith(LETTER_HOP_PREFIX):
        return None
    stated_begin = prompt_at + len(LETTER_HOP_PREFIX) - 1  # the space before the answer word
    stated = _tokens_in(starts, stated_begin, prompt_at + prompt.index("\n"))
    # a text-only record: the language model alone (no media, so no cross-attention runs)
    attentions = model.language_model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    result = {"mark_right": [], "mark_other": [], "read_right": [], "read_other": []}
    for layer in attentions:  # (1, H, L, L)
        weights = layer[0].float()
        mark, read = {}, {}
        for letter, (begin, end, text_begin) in lines.items():
            first = _tokens_in(starts, text_begin - 1, end)[0]  # the option's first text token
            mark[letter] = weights[:, first, stated].sum(-1)
            read[letter] = weights[:, predicts, _tokens_in(starts, begin, end)].sum(-1)
        others = [x for x in LETTERS if x != answer_letter]
        result["mark_right"].append(mark[answer_letter].tolist())
        result["mark_other"].append(torch.stack([mark[x] for x in others]).mean(0).tolist())
        result["read_right"].append(read[answer_letter].tolist())
        result["read_other"].append(torch.stack([read[x] for x in others]).mean(0).tolist())
    return result


def main() -> None:
    args = parser(__doc__).parse_args()
    model, processor = load_probed(args)
    model.language_model.set_attn_implementation("eager")  # attention weights are returned only by eager
    rows = [m for r in json.loads(args.records.read_text())[: args.n] if (m := measure(model, processor, r))]
    mean = {k: torch.tensor([row[k] for row in rows]).mean(0) for k in rows[0]}  # (layers, heads)
    report = {"model": str(args.model), "checkpoint": args.checkpoint, "records": len(rows), "layers": []}
    for layer in range(mean["mark_right"].shape[0]):
        entry = {}
        for part in ("mark", "read"):
            gap = mean[f"{part}_right"][layer] - mean[f"{part}_other"][layer]
            head = int(gap.argmax())
            entry[part] = {"head": head, "right": round(float(mean[f"{part}_right"][layer, head]), 3),
                           "others": round(float(mean[f"{part}_other"][layer, head]), 3)}
        report["layers"].append(entry)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
