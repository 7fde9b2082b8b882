"""The vision-to-language projector: a 2-layer MLP, shared by pooled and original tokens."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class Projector(nn.Module):
    """`Linear(Dv, D) -> act -> Linear(D, D)`, named as in LLaVA so LLaVA-family projector
    weights map onto it one to one."""

    def __init__(self, vision_width: int, text_width: int, activation: str = "gelu") -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_width, text_width)
        self.act = ACT2FN[activation]
        self.linear_2 = nn.Linear(text_width, text_width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (..., Dv) -> (..., D)
        return self.linear_2(self.act(self.linear_1(features)))
