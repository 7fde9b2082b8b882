"""What lmms-eval asks of a model, answered by a CrossLMM checkpoint.

lmms-eval is an optional extra (`pip install crosslmm[lmms-eval]`): this module does not
import it, so the request handling is tested without it; `crosslmm.models.crosslmm`
binds it to lmms-eval's base class. Requests are lmms-eval `Instance`s (anything with
`.args`):

- generate_until: args (context, gen_kwargs, doc_to_visual, doc_id, task, split); the
  visuals are `doc_to_visual(task_dict[task][split][doc_id])` (video paths, image paths or
  PIL images), placed before the context; `gen_kwargs` honoured: max_new_tokens,
  temperature (0: greedy), do_sample, top_p, num_beams (1 only), until (a string or a
  list; the answer is cut at the first).
- loglikelihood: args (context, continuation, doc_to_visual, doc_id, task, split); returns
  (mean negative log-likelihood of the continuation's tokens, whether greedy decoding
  would produce it), the convention of lmms-eval's LLaVA models (lower is likelier:
  PerceptionTest's ppl variant picks the minimum).
- generate_until_multi_round: refused with a message (no task of the paper needs it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crosslmm.data.video import still_clip

DEFAULT_UNTIL = ["\n\n"]


class CrossLMMHarnessModel:
    """The request handling of the `crosslmm` lmms-eval model."""

    def _setup(self, pretrained: str | None = None, max_frames_num: int | str | None = None, device: str | None = None,
               batch_size: int | str = 1, **ignored: Any) -> None:
        from crosslmm.eval.harness import default_device
        from crosslmm.infer import default_model_dir, load

        self.model, self.processor = load(pretrained or default_model_dir(), device=device or default_device())
        if max_frames_num is not None:
            self.processor.num_frames, self.processor.fps = int(max_frames_num), None
        self.batch_size_per_gpu = int(batch_size)
        self.device = next(self.model.parameters()).device
        self.task_dict = getattr(self, "task_dict", {})
        self._rank = int(os.environ.get("RANK", "0"))
        self._world_size = int(os.environ.get("WORLD_SIZE", "1"))

    # ------------------------------------------------------------------ lmms-eval API

    def generate_until(self, requests) -> list[str]:
        answers = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            media = self._visuals(doc_to_visual, doc_id, task, split)
            answers.append(self._generate(context, media, dict(gen_kwargs or {})))
        return answers

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            media = self._visuals(doc_to_visual, doc_id, task, split)
            results.append(self._loglikelihood(context, continuation, media))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the crosslmm lmms-eval model does not implement generate_until_multi_round "
                                  "(multi-round tasks); none of the paper's benchmarks uses it")

    # ------------------------------------------------------------------ helpers

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list[Any]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        return [_as_media(item) for item in (visuals or [])]

    def _prompt(self, context: str, media: list[Any]) -> str:
        return "".join("<video>\n" for _ in media) + context

    def _generate(self, context: str, media: list[Any], gen_kwargs: dict) -> str:
        until = gen_kwargs.pop("until", None) or DEFAULT_UNTIL
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
        options = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens", 128)), "do_sample": do_sample,
                   "num_beams": int(gen_kwargs.get("num_beams", 1) or 1)}
        if do_sample:
            options["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                options["top_p"] = float(gen_kwargs["top_p"])
        inputs = self.processor([{"role": "user", "content": self._prompt(context, media)}], media=media)
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        with torch.inference_mode():
            output = self.model.generate(**inputs, stop_strings=until, tokenizer=self.processor.tokenizer, **options)
        text = self.processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for stop in until:
            text = text.split(stop)[0]
        return text.strip()

    def _loglikelihood(self, context: str, continuation: str, media: list[Any]) -> tuple[float, bool]:
        messages = [{"role": "user", "content": self._prompt(context, media)}]
        inputs = self.processor(messages, media=media)
        continuation_ids = self.processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not continuation_ids:
            raise ValueError("loglikelihood needs a non-empty continuation")
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([continuation_ids])], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        with torch.inference_mode():
            logits = self.model(**inputs).logits[0].float()  # (expanded length, vocab)
        # The last len(continuation) positions of the expanded sequence are the
        # continuation; each is predicted by the position before it.
        n = len(continuation_ids)
        predicting = logits[-n - 1:-1]
        target = torch.tensor(continuation_ids, device=predicting.device)
        nll = torch.nn.functional.cross_entropy(predicting, target).item()
        greedy = bool((predicting.argmax(-1) == target).all())
        return nll, greedy


def _as_media(item: Any) -> Any:
    """A path stays a path (video or image, decided by content); a PIL image becomes a
    one-frame clip."""
    if isinstance(item, (str, os.PathLike)):
        return Path(item)
    if hasattr(item, "convert"):  # PIL.Image.Image
        return still_clip(np.asarray(item.convert("RGB")))
    raise TypeError(f"doc_to_visual gave a {type(item).__name__}; expected a video/image path or a PIL image")
