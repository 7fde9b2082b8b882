"""The `crosslmm` model of lmms-eval (needs `pip install crosslmm[lmms-eval]`); the request
handling is `crosslmm.eval.lmms_plugin.CrossLMMHarnessModel`."""

from __future__ import annotations

from typing import Any

from lmms_eval.api.model import lmms

from crosslmm.eval.lmms_plugin import CrossLMMHarnessModel


class CrossLMM(CrossLMMHarnessModel, lmms):
    """`--model crosslmm --model_args pretrained=DIR[,max_frames_num=N][,device=cuda:0]`;
    without `pretrained`, the bundled synthetic-world model."""

    def __init__(self, pretrained: str | None = None, max_frames_num: int | str | None = None,
                 device: str | None = None, batch_size: int | str = 1, **kwargs: Any) -> None:
        lmms.__init__(self)
        self._setup(pretrained=pretrained, max_frames_num=max_frames_num, device=device, batch_size=batch_size, **kwargs)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size
