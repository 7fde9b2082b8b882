"""uint8 RGB frames -> normalised (T, 3, S, S) pixel values for the vision tower.

Reproduces the PIL path of transformers' SigLIP/CLIP image processors step for step
(PIL resize of the uint8 image, centre crop, float64 rescale cast to float32, float32
normalise), so the numbers equal what `SiglipImageProcessorPil`/`CLIPImageProcessorPil`
give, bit for bit: a checkpoint sees the pixels it was trained on. transformers' default
torchvision backend resizes with torch kernels and differs by resize rounding; torchvision
is not a dependency here, so the PIL path is the reference.

Only fixed square outputs are supported: the vision tower reads a fixed patch grid.
"""

from __future__ import annotations

import functools

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from crosslmm.data.video import VideoClip

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
RESCALE_1_255 = 1 / 255

ResizeMode = Literal["square", "shortest_edge", "none"]

# Defaults of the transformers processor classes, for keys a config leaves out.
_BICUBIC, _BILINEAR = int(Image.Resampling.BICUBIC), int(Image.Resampling.BILINEAR)
_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "siglip": {"resample": _BICUBIC, "image_mean": HALF, "image_std": HALF, "do_center_crop": False},
    # SigLIP2's NaFlex resize is replaced by a fixed square: the tower runs a fixed grid.
    "siglip2": {"resample": _BILINEAR, "image_mean": HALF, "image_std": HALF, "do_center_crop": False},
    "clip": {
        "resample": _BICUBIC, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD, "do_center_crop": True,
    },
    "generic": {"resample": _BICUBIC, "do_center_crop": False},
}
_PROCESSOR_TYPES = {
    "SiglipImageProcessor": "siglip",
    "Siglip2ImageProcessor": "siglip2",
    "CLIPImageProcessor": "clip",
    "CLIPFeatureExtractor": "clip",
}
_MODEL_TYPES = {
    "siglip": "siglip", "siglip_vision_model": "siglip",
    "siglip2": "siglip2", "siglip2_vision_model": "siglip2",
    "clip": "clip", "clip_vision_model": "clip",
}


@dataclass(frozen=True)
class FrameProcessor:
    """Resize (+ optional centre crop), rescale and normalise frames.

    `size` is the square side for `resize_mode="square"` (SigLIP) or the shortest edge
    for `"shortest_edge"` (CLIP, followed by a `crop_size` centre crop).
    """

    size: int
    resize_mode: ResizeMode = "square"
    crop_size: int | None = None
    resample: int = _BICUBIC
    rescale_factor: float | None = RESCALE_1_255  # None: no rescale
    image_mean: tuple[float, ...] | None = HALF  # None (with image_std): no normalise
    image_std: tuple[float, ...] | None = HALF

    def __post_init__(self) -> None:
        if self.crop_size is None and self.resize_mode != "square":
            raise ValueError(
                f"resize_mode={self.resize_mode!r} without a centre crop gives frames of varying shape; "
                "the vision tower needs a fixed square: set crop_size or use resize_mode='square'"
            )
        if (self.image_mean is None) != (self.image_std is None):
            raise ValueError("image_mean and image_std go together")
        if self.image_mean is not None and not (len(self.image_mean) == len(self.image_std) == 3):
            raise ValueError(f"image_mean/std need 3 values, got {self.image_mean} / {self.image_std}")

    @property
    def output_size(self) -> int:
        return self.crop_size if self.crop_size is not None else self.size

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_vision_config(cls, image_size: int, model_type: str) -> FrameProcessor:
        """The processor a SigLIP / SigLIP2 / CLIP tower of `image_size` expects."""
        family = _MODEL_TYPES.get(model_type)
        if family is None:
            raise ValueError(f"unknown vision model_type {model_type!r}; expected one of {sorted(_MODEL_TYPES)}")
        defaults = _TYPE_DEFAULTS[family]
        return cls(
            size=image_size,
            resize_mode="shortest_edge" if family == "clip" else "square",
            crop_size=image_size if family == "clip" else None,
            resample=defaults["resample"],
            image_mean=defaults["image_mean"],
            image_std=defaults["image_std"],
        )

    @classmethod
    def from_preprocessor_config(
        cls, config: Mapping[str, Any] | str | os.PathLike, image_size: int | None = None
    ) -> FrameProcessor:
        """Build from a transformers `preprocessor_config.json` (a dict, the file, or its folder).

        `image_size` is required when the config names no fixed size (SigLIP2 NaFlex) and is
        otherwise checked against it, so a processor/tower mismatch fails here rather than
        as a shape error deep in the model.
        """
        config = _read_config(config)
        type_name = str(config.get("image_processor_type") or config.get("feature_extractor_type") or "")
        family = _PROCESSOR_TYPES.get(_strip_backend_suffix(type_name), "generic")
        settings = {**_TYPE_DEFAULTS[family], **{k: v for k, v in config.items() if v is not None}}

        size, resize_mode = _parse_size(settings.get("size"), family, image_size)
        if not settings.get("do_resize", True):
            resize_mode = "none"
        rescale, normalize = settings.get("do_rescale", True), settings.get("do_normalize", True)
        processor = cls(
            size=size,
            resize_mode=resize_mode,
            crop_size=_parse_crop(settings) if settings.get("do_center_crop") else None,
            resample=_parse_resample(settings["resample"]),
            rescale_factor=float(settings.get("rescale_factor", RESCALE_1_255)) if rescale else None,
            image_mean=_triple(settings, "image_mean") if normalize else None,
            image_std=_triple(settings, "image_std") if normalize else None,
        )
        if image_size is not None and processor.output_size != image_size:
            raise ValueError(
                f"preprocessor config gives {processor.output_size}px frames; the vision tower expects {image_size}px"
            )
        return processor

    # ------------------------------------------------------------------ processing

    def __call__(self, frames: np.ndarray | VideoClip) -> torch.Tensor:
        """(T, H, W, 3) uint8 RGB (or a VideoClip) -> (T, 3, S, S) float32."""
        return self.normalize(self.resize(frames))

    def resize(self, frames: np.ndarray | VideoClip) -> torch.Tensor:
        """(T, H, W, 3) uint8 RGB (or a VideoClip) -> (T, 3, S, S) uint8: the geometry
        only. Training data workers ship this (a quarter of float32's bytes through the
        worker queue and to the GPU) and the trainer normalises on the device."""
        if isinstance(frames, VideoClip):
            frames = frames.frames
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected (T, H, W, 3) uint8 RGB frames, got shape {frames.shape} dtype {frames.dtype}")
        pixels = np.stack([self._geometry(frame) for frame in frames])
        if pixels.shape[1:3] != (self.output_size, self.output_size):
            raise ValueError(
                f"frames of {frames.shape[2]}x{frames.shape[1]} give {pixels.shape[2]}x{pixels.shape[1]} "
                f"without resizing; expected {self.output_size}x{self.output_size}"
            )
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(T, 3, S, S) uint8 on any device -> float32 pixel values. Each output value
        depends only on (channel, byte), so it is a lookup in a 3 x 256 table computed
        once with transformers' arithmetic (`_values`): the same numbers on every device."""
        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected (T, 3, S, S) uint8 pixels, got {tuple(pixels.shape)} {pixels.dtype}")
        table = self._byte_table.to(pixels.device)  # (3, 256)
        channel = torch.arange(3, device=pixels.device).view(1, 3, 1, 1)
        return table[channel, pixels.long()]

    @functools.cached_property
    def _byte_table(self) -> torch.Tensor:
        """(3, 256) float32: each channel's value for each byte, computed once per processor."""
        return torch.from_numpy(self._values(np.tile(np.arange(256, dtype=np.uint8)[:, None], (1, 3)))).T.contiguous()

    def _geometry(self, frame: np.ndarray) -> np.ndarray:
        """Resize then crop, on uint8 with PIL, as the transformers PIL backend does."""
        height, width = frame.shape[:2]
        if self.resize_mode == "square":
            frame = _pil_resize(frame, (self.size, self.size), self.resample)
        elif self.resize_mode == "shortest_edge":
            frame = _pil_resize(frame, _shortest_edge_size(height, width, self.size), self.resample)
        if self.crop_size is not None:
            frame = _center_crop(frame, self.crop_size)
        return frame

    def _values(self, pixels: np.ndarray) -> np.ndarray:
        """Rescale in float64 then cast, normalise in float32: transformers' exact order."""
        if self.rescale_factor is not None:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            pixels = pixels.astype(np.float32)
        if self.image_mean is not None:
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            pixels = (pixels - mean) / std
        return pixels


# --------------------------------------------------------------------------- helpers


def _pil_resize(frame: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    height, width = size
    return np.asarray(Image.fromarray(frame).resize((width, height), resample=resample))


def _shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) with the short side at `shortest_edge`; the long side truncated,
    as transformers (and torchvision) compute it."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def _center_crop(frame: np.ndarray, side: int) -> np.ndarray:
    """Centre crop; a frame smaller than the crop is zero-padded around the centre first
    (transformers' behaviour: the output always has the crop size)."""
    height, width = frame.shape[:2]
    if height < side or width < side:
        padded = np.zeros((max(height, side), max(width, side), frame.shape[2]), dtype=frame.dtype)
        top, left = -(-(padded.shape[0] - height) // 2), -(-(padded.shape[1] - width) // 2)
        padded[top:top + height, left:left + width] = frame
        frame, (height, width) = padded, padded.shape[:2]
    top, left = (height - side) // 2, (width - side) // 2
    return frame[top:top + side, left:left + side]


def _read_config(config: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    if path.is_dir():
        path = path / "preprocessor_config.json"
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _strip_backend_suffix(type_name: str) -> str:
    for suffix in ("Pil", "Fast"):
        if type_name.endswith(suffix):
            return type_name[: -len(suffix)]
    return type_name


def _parse_size(size: Any, family: str, image_size: int | None) -> tuple[int, ResizeMode]:
    """`size` as transformers writes it: {"height", "width"}, {"shortest_edge"}, a bare int
    (a shortest edge, as transformers reads it for these classes) or [h, w]."""
    if size is None:
        if image_size is None:
            raise ValueError(f"the {family} preprocessor config names no size; pass image_size")
        return image_size, "square"
    if isinstance(size, int):
        return size, "shortest_edge"
    if isinstance(size, (list, tuple)) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    if isinstance(size, Mapping):
        if "longest_edge" in size or "max_height" in size:
            raise ValueError(f"aspect-preserving size {dict(size)} is not supported; frames must be square")
        if "shortest_edge" in size:
            return int(size["shortest_edge"]), "shortest_edge"
        if "height" in size and "width" in size:
            if size["height"] != size["width"]:
                raise ValueError(f"size {dict(size)} is not square; the vision tower needs square frames")
            return int(size["height"]), "square"
    raise ValueError(f"unsupported size {size!r} in preprocessor config")


def _parse_crop(settings: Mapping[str, Any]) -> int:
    crop = settings.get("crop_size")
    if crop is None:
        raise ValueError("do_center_crop is set but the preprocessor config has no crop_size")
    if isinstance(crop, int):
        return crop
    if isinstance(crop, Mapping) and crop.get("height") == crop.get("width") and crop.get("height"):
        return int(crop["height"])
    raise ValueError(f"crop_size {crop!r} is not a square")


def _parse_resample(value: int | str) -> int:
    if isinstance(value, str):
        try:
            return int(Image.Resampling[value.upper()])
        except KeyError:
            raise ValueError(f"unknown resample filter {value!r}") from None
    return int(Image.Resampling(int(value)))


def _triple(settings: Mapping[str, Any], key: str) -> tuple[float, float, float]:
    value = settings.get(key)
    if value is None:
        raise ValueError(f"the preprocessor config has no {key}")
    values = (float(value),) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{key} needs 3 values, got {value!r}")
    return values
