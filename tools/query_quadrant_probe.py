"""Does the query that predicts a place-and-time answer know the place? Linear probes on it.

For the held-out questions of a synthetic world that name a quadrant and a frame ("the
object in the top-left quadrant in frame 3"), the residual stream of the text token that
predicts the answer (the token whose T2V query the grounding loss supervises) after each
decoder layer; a linear classifier per layer, fitted on the first 70 % of the questions and
scored on the rest, for the named quadrant (chance 25 %) and frame (12.5 %). Why: a T2V
that finds the named frame but not the quadrant (docs/synthetic.md, seventh session) either
gets no quadrant in its query, or gets it and does not match it to the keys.

    python tools/query_quadrant_probe.py MODEL CHECKPOINT|- DATA_ROOT N
"""
from __future__ import annotations

import json

import torch

from crosslmm.synth.world import AT_REGION_TIME, REGIONS
from probe_model import answer_query_states, load_probed, parser


def fit_and_score(x: torch.Tensor, y: torch.Tensor, classes: int, split: float = 0.7) -> float:
    """Held-out accuracy of a multinomial logistic regression (standardised inputs, L2, LBFGS)."""
    cut = int(len(x) * split)
    mean, std = x[:cut].mean(0), x[:cut].std(0) + 1e-6
    x = (x - mean) / std
    linear = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x[:cut]), y[:cut]) + 1e-3 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((linear(x[cut:]).argmax(-1) == y[cut:]).float().mean())


@torch.no_grad()
def ridge_score(x: torch.Tensor, y: torch.Tensor, classes: int, strength: float, split: float = 0.7) -> float:
    """Held-out accuracy of a ridge classifier (standardised inputs, one-hot targets,
    closed form): deterministic, and its `strength` says how much a direction of small
    variance is discounted. A linear map keeps everything a weak probe (0.01) can read;
    a strong one (1) reads only what stands out, as `fit_and_score`'s L2 does."""
    cut = int(len(x) * split)
    mean, std = x[:cut].mean(0), x[:cut].std(0) + 1e-6
    x = torch.cat([(x - mean) / std, torch.ones(len(x), 1)], dim=1).double()
    targets = torch.nn.functional.one_hot(y, classes).double()
    gram = x[:cut].T @ x[:cut] + strength * torch.eye(x.shape[1], dtype=x.dtype)
    weight = torch.linalg.solve(gram, x[:cut].T @ targets[:cut])
    return float(((x[cut:] @ weight).argmax(-1) == y[cut:]).float().mean())


@torch.no_grad()
def main() -> None:
    args = parser(__doc__).parse_args()
    model, processor = load_probed(args)
    records = json.loads((args.records / "test.json").read_text())
    states, quadrant, frame = [], [], []
    for record in records:
        if len(states) == args.n:
            break
        match = AT_REGION_TIME.search(record["conversations"][0]["value"])
        if match is None:
            continue
        item = processor.encode_record(record, args.records)
        states.append(answer_query_states(model, item)[0])  # (layers, D)
        quadrant.append(REGIONS.index(match[1]))
        frame.append(int(match[2]) - 1)
    x = torch.stack(states).float()  # (questions, layers, D)
    quadrant, frame = torch.tensor(quadrant), torch.tensor(frame)
    print(json.dumps({
        "model": str(args.model), "checkpoint": args.checkpoint, "questions": len(states),
        "quadrant accuracy after each decoder layer": [round(fit_and_score(x[:, i], quadrant, 4), 3) for i in range(x.shape[1])],
        "frame accuracy after each decoder layer": [round(fit_and_score(x[:, i], frame, 8), 3) for i in range(x.shape[1])],
    }, indent=1))


if __name__ == "__main__":
    main()
