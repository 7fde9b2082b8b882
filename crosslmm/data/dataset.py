"""LLaVA-format training data: record files, YAML mixtures, a Dataset, a collator and a
length-grouped sampler.

A bad record is skipped, never replaced: `LLaVADataset` returns None for it (logging
the id and the reason) and `DataCollator` drops the Nones. Substituting another sample
(the usual "retry a random index" trick) silently changes the data mixture and hides
broken records; a shorter batch is the honest outcome.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import Dataset, Sampler
from transformers import PreTrainedTokenizerBase

from crosslmm.data.processor import IGNORE_INDEX, PLACEHOLDERS, CrossLMMProcessor, RecordError

logger = logging.getLogger("crosslmm.data")

Record = dict[str, Any]
RecordWithRoot = tuple[Record, Path]
_DATASET_KEYS = {"path", "sampling", "media_root"}
_MIXTURE_KEYS = {"datasets", "media_root", "seed"}


# --------------------------------------------------------------------------- files


def load_records(path: str | Path) -> list[Record]:
    """Records from a `.json` file (a list) or a `.jsonl` file (one record a line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "no such data file", str(path))
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                records.append(_parse_json(line, f"{path}:{number}"))
    elif path.suffix == ".json":
        records = _parse_json(path.read_text(encoding="utf-8"), str(path))
        if not isinstance(records, list):
            raise ValueError(f"{path} must hold a JSON list of records, got {type(records).__name__}")
    else:
        raise ValueError(f"{path}: expected a .json or .jsonl file")
    for n, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {n} is a {type(record).__name__}, expected an object")
    return records


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON: {err}") from err


def load_mixture(yaml_path: str | Path) -> list[RecordWithRoot]:
    """(record, media_root) pairs from a YAML mixture of datasets.

    Paths in the YAML are relative to the YAML file. `media_root` defaults to the YAML's
    folder. Sampling per dataset: `all`, `first:N`, `random:N` or `N%` (a random N
    percent, rounded up); the random ones are deterministic given `seed` and the
    dataset's path, and keep the file's order. Asking for more records than a file has
    is an error, not a silent "all". Bad entries, sampling strings and missing data files
    raise ValueError naming the YAML entry.
    """
    yaml_path = Path(yaml_path)
    if not yaml_path.is_file():
        raise FileNotFoundError(2, "no such mixture file", str(yaml_path))
    spec = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    if not isinstance(spec, dict) or not isinstance(spec.get("datasets"), list) or not spec["datasets"]:
        raise ValueError(f"{yaml_path} must be a mapping with a non-empty 'datasets' list")
    _reject_unknown(spec, _MIXTURE_KEYS, str(yaml_path))
    base = yaml_path.parent
    default_root = base / spec.get("media_root", ".")
    seed = spec.get("seed", 0)

    pairs: list[RecordWithRoot] = []
    for n, entry in enumerate(spec["datasets"]):
        where = f"{yaml_path}: datasets[{n}]"
        if not isinstance(entry, dict) or "path" not in entry:
            raise ValueError(f"{where} must be a mapping with a 'path'")
        _reject_unknown(entry, _DATASET_KEYS, where)
        data_path = base / entry["path"]
        if not data_path.is_file():
            raise ValueError(f"{where}: data file {data_path} does not exist")
        records = load_records(data_path)
        chosen = sample_records(records, str(entry.get("sampling", "all")), seed=f"{seed}/{entry['path']}", where=where)
        root = base / entry["media_root"] if "media_root" in entry else default_root
        pairs += [(record, root) for record in chosen]
    return pairs


def sample_records(records: Sequence[Record], sampling: str, seed: Any = 0, where: str = "dataset") -> list[Record]:
    """Apply one sampling rule (`all`, `first:N`, `random:N`, `N%`) to a record list."""
    total = len(records)
    sampling = sampling.strip()
    if sampling == "all":
        return list(records)
    if match := re.fullmatch(r"first:(\d+)", sampling):
        return list(records[: _count(int(match[1]), total, where)])
    if match := re.fullmatch(r"random:(\d+)", sampling):
        return _random_subset(records, _count(int(match[1]), total, where), seed)
    if match := re.fullmatch(r"(\d+(?:\.\d+)?)%", sampling):
        percent = float(match[1])
        if not 0 < percent <= 100:
            raise ValueError(f"{where}: sampling {sampling!r} must be a percentage in (0, 100]")
        return _random_subset(records, math.ceil(total * percent / 100), seed)
    raise ValueError(f"{where}: unknown sampling {sampling!r}; expected all, first:N, random:N or N%")


def _count(n: int, total: int, where: str) -> int:
    if n > total:
        raise ValueError(f"{where}: asks for {n} records but the file has only {total}")
    return n


def _random_subset(records: Sequence[Record], n: int, seed: Any) -> list[Record]:
    # A str seed is hashed deterministically by `random` (not by Python's salted hash).
    chosen = sorted(random.Random(str(seed)).sample(range(len(records)), n))
    return [records[i] for i in chosen]


def _reject_unknown(mapping: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(mapping) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")


# --------------------------------------------------------------------------- dataset


class LLaVADataset(Dataset):
    """Encoded records, or None for a record that raised RecordError.

    `skipped` counts the records skipped by this object. With DataLoader workers each
    worker holds its own copy of the dataset, so the count is per worker (and the main
    process's copy stays at 0); `DataCollator.skipped` has the same caveat. The log
    warnings come from every worker.
    """

    def __init__(
        self,
        pairs: Sequence[RecordWithRoot],
        processor: CrossLMMProcessor,
        *,
        load_pixels: bool = True,
        frame_counts: Mapping[str, int] | None = None,
        uint8_pixels: bool = False,
    ) -> None:
        self.pairs = list(pairs)
        self.uint8_pixels = uint8_pixels
        self.processor = processor
        self.load_pixels = load_pixels
        self.frame_counts = frame_counts
        self.skipped = 0
        self.lengths = [estimate_length(record, processor) for record, _ in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self.encode(index)[0]

    def encode(self, index: int) -> tuple[dict[str, Any] | None, str | None]:
        """(encoded record, None), or (None, why it was skipped)."""
        record, media_root = self.pairs[index]
        try:
            encoded = self.processor.encode_record(
                record, media_root, load_pixels=self.load_pixels, frame_counts=self.frame_counts,
                uint8_pixels=self.uint8_pixels,
            )
        except RecordError as err:
            self.skipped += 1
            logger.warning("skipping record %s", err)
            return None, str(err)
        if record.get("grounding") is not None:  # per answer, the originals it is about (crosslmm.train.grounding)
            encoded["grounding"] = record["grounding"]
        return encoded, None


def estimate_length(record: Mapping[str, Any], processor: CrossLMMProcessor) -> int:
    """Rough token count without tokenizing or decoding, for length grouping only:
    characters / 3 for the text, plus each media item's visual tokens (images: one frame;
    videos: `num_frames`, or `max_frames` with fps sampling, an upper bound)."""
    turns = record.get("conversations") or []
    text = "".join(str(turn.get("value", "")) for turn in turns if isinstance(turn, Mapping))
    for placeholder in PLACEHOLDERS:
        text = text.replace(placeholder, "")
    media = record.get("video") or record.get("image") or []
    count = 1 if isinstance(media, str) else len(media)
    if record.get("video") is not None:
        sampling = processor.sampling
        frames = sampling["num_frames"] or sampling["max_frames"]
    else:
        frames = 1
    visual = count * (frames * processor.tokens_per_frame + processor.tokens_after_media)
    return len(text) // 3 + visual


# --------------------------------------------------------------------------- batching


class DataCollator:
    """Encoded examples -> a right-padded batch for `CrossLMMForCausalLM.forward`.

    Media are concatenated in sample order, which is the placeholder order the model
    expects; `media_keys` is flat and aligned with `media_num_frames` (a feature cache
    returns features in the same order). Returns None when every item was skipped.
    """

    def __init__(self, pad: int | PreTrainedTokenizerBase) -> None:
        """`pad`: the pad id (`processor.pad_token_id`) or a tokenizer, whose pad id (or
        eos id when it has no pad token) is used."""
        if not isinstance(pad, int):
            pad = pad.pad_token_id if pad.pad_token_id is not None else pad.eos_token_id
            if pad is None:
                raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        self.pad_token_id = int(pad)
        self.skipped = 0

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
        examples = [item for item in items if item is not None]
        self.skipped += len(items) - len(examples)
        if not examples:
            return None
        return {
            "input_ids": _pad([e["input_ids"] for e in examples], self.pad_token_id),
            "attention_mask": _pad([torch.ones_like(e["input_ids"]) for e in examples], 0),
            "labels": _pad([e["labels"] for e in examples], IGNORE_INDEX),
            "pixel_values": _concat_pixels(examples),
            "media_num_frames": torch.cat([e["media_num_frames"].long().reshape(-1) for e in examples]),
            "ids": [e["id"] for e in examples],
            "media_keys": [key for e in examples for key in e["media_keys"]],
            "grounding": [e.get("grounding") for e in examples],
        }


def _pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _concat_pixels(examples: list[dict[str, Any]]) -> torch.Tensor | None:
    """All frames in order, or None when no example has pixels. A batch where some media
    have pixels and others not (mixed load_pixels) cannot be fed to the model: error."""
    with_media = [e for e in examples if len(e["media_num_frames"]) > 0]
    with_pixels = [e for e in with_media if e["pixel_values"] is not None]
    if not with_pixels:
        return None
    if len(with_pixels) != len(with_media):
        raise ValueError("some examples in the batch have pixel_values and others with media do not")
    return torch.cat([e["pixel_values"] for e in with_pixels])


class LengthGroupedSampler(Sampler[int]):
    """Shuffled indices where neighbouring batches have similar lengths (less padding).

    Each epoch: a permutation seeded by (seed, epoch), cut into mega-batches of
    `batch_size * mega_batch_mult`, each sorted by length, longest first. Consecutive runs
    of `batch_size` indices are the batches. Call `set_epoch` each epoch for a new order.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega_batch_mult: int = 50) -> None:
        if batch_size < 1 or mega_batch_mult < 1:
            raise ValueError(f"batch_size and mega_batch_mult must be >= 1, got {batch_size}, {mega_batch_mult}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_size = batch_size * mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        for start in range(0, len(order), self.mega_batch_size):
            mega_batch = order[start : start + self.mega_batch_size]
            yield from sorted(mega_batch, key=lambda i: self.lengths[i], reverse=True)
