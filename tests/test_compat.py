"""Our code speaks the names the installed transformers expects (crosslmm/compat.py).

transformers deprecates a name by warning (a FutureWarning from `deprecate_kwarg`, or a
`warning_once` on its logger) for a few releases and then removes it; a call that only
warns today crashes a user's install tomorrow. So these tests turn every such warning
into a failure while the model runs forward, backward (with activation checkpointing),
cached generation and a benchmark decode step, on whatever release is installed.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from contextlib import contextmanager

import pytest
import torch
from transformers import Qwen2Model
from transformers.utils import logging as hf_logging

from conftest import MEDIA, frames, set_gates, tiny_model
from crosslmm import compat

pytestmark = pytest.mark.lowest_bound  # also run on the lowest supported transformers (.ci/run)


@contextmanager
def no_deprecations():
    """Fail on any FutureWarning/DeprecationWarning and any deprecation message on
    transformers' logger raised inside the block."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("transformers")
    handler, level = Collect(level=logging.WARNING), logger.level
    hf_logging.warning_once.cache_clear()  # an earlier test may already have printed the "once" message
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    deprecated = [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()]
    assert not deprecated, deprecated


def test_the_cache_name_is_the_one_the_installed_llm_takes():
    parameters = inspect.signature(Qwen2Model.forward).parameters
    assert compat.CACHE_NAME in parameters
    assert compat.CACHE_NAME in {"cache", "past_key_values"}


def test_forward_backward_and_generate_use_no_deprecated_transformers_name():
    model = tiny_model().train()
    set_gates(model)
    ids = torch.tensor([[5, MEDIA, 6, 7, 8, 9]])
    labels = ids.masked_fill(ids == MEDIA, -100)
    with no_deprecations():
        compat.enable_activation_checkpointing(model)
        out = model(ids, pixel_values=frames(2), media_num_frames=torch.tensor([2]), labels=labels)
        out.loss.backward()
        model.eval()
        prefill = model(ids, pixel_values=frames(2), media_num_frames=torch.tensor([2]), use_cache=True)
        step = model(torch.tensor([[10]]), attention_mask=torch.ones(1, prefill.attention_mask.shape[1] + 1, dtype=torch.long),
                     cache=prefill.cache, cross_attention_cache=prefill.cross_attention_cache, use_cache=True)
        generated = model.generate(ids, pixel_values=frames(2), media_num_frames=torch.tensor([2]), max_new_tokens=4,
                                   eos_token_id=[], do_sample=True, num_return_sequences=2,
                                   generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(step.logits).all() and generated.shape == (2, 10)
    assert prefill.cache is not None and prefill.cache.get_seq_length() > 0


def test_the_language_side_benchmark_decode_uses_no_deprecated_name():
    from crosslmm.bench.efficiency import _subject

    subject = _subject("tiny", "crosslmm", 4, 2, True, torch.device("cpu"), torch.float32)
    with no_deprecations(), torch.no_grad():
        out = subject.prefill()
        mask = torch.cat([subject.prefill_mask(out), torch.ones(1, 1, dtype=torch.long)], dim=1)
        subject.decode_step(out, torch.tensor([[3]]), mask)


def test_the_old_cache_name_still_works_with_a_future_warning(model):
    ids = torch.tensor([[5, MEDIA, 6]])
    prefill = model(ids, pixel_values=frames(1), media_num_frames=torch.tensor([1]), use_cache=True)
    mask = torch.ones(1, prefill.attention_mask.shape[1] + 1, dtype=torch.long)
    with pytest.warns(FutureWarning, match="past_key_values"):
        legacy_cache = prefill.past_key_values
    assert legacy_cache is prefill.cache

    def step(**cache):
        fresh = model(ids, pixel_values=frames(1), media_num_frames=torch.tensor([1]), use_cache=True)
        return model(torch.tensor([[7]]), attention_mask=mask, cross_attention_cache=fresh.cross_attention_cache,
                     **{name: fresh.cache for name in cache})

    new = step(cache=True)
    with pytest.warns(FutureWarning, match="pass `cache` instead"):
        old = step(past_key_values=True)
    torch.testing.assert_close(old.logits, new.logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not both"):
        model(torch.tensor([[7]]), attention_mask=mask, cache=prefill.cache, past_key_values=prefill.cache,
              cross_attention_cache=prefill.cross_attention_cache)


# Packages whose internals crosslmm relies on: each must have an upper bound (the newest
# release the suite has passed on, docs/compatibility.md).
BOUNDED = ("torch", "transformers", "accelerate", "av")


def _declared_requirements():
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    return [Requirement(line) for line in pyproject["project"]["dependencies"]]


def test_every_installed_dependency_is_inside_its_declared_range():
    from importlib.metadata import version

    outside = [
        f"{req.name} {version(req.name)} not in {req.specifier}"
        for req in _declared_requirements()
        if req.specifier and not req.specifier.contains(version(req.name), prereleases=True)
    ]
    assert not outside, outside


def test_packages_whose_internals_we_rely_on_have_a_tested_upper_bound():
    declared = {req.name: req.specifier for req in _declared_requirements()}
    for name in BOUNDED:
        assert any(spec.operator in ("<=", "<", "==") for spec in declared[name]), f"{name} has no upper bound"


# The GPU machines our benchmarks run on (docs/performance.md) have these preinstalled;
# the declared ranges must keep admitting them, or a GPU session would reinstall torch.
GPU_IMAGE = {"torch": "2.11.0", "transformers": "5.17.0"}


def test_the_gpu_image_stays_inside_the_supported_range():
    declared = {req.name: req.specifier for req in _declared_requirements()}
    for name, installed in GPU_IMAGE.items():
        assert declared[name].contains(installed), f"{name} {installed} (GPU image) not in {declared[name]}"


def test_raising_a_bound_rewrites_only_that_requirement(tmp_path, monkeypatch):
    """`tools/deps.py raise` writes the new bound only after the suite passed; here only
    its edit of pyproject.toml and of the tested-releases table (the suite run is CI's)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).parents[1]
    spec = importlib.util.spec_from_file_location("deps", root / "tools" / "deps.py")
    deps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deps)
    pyproject, table = tmp_path / "pyproject.toml", tmp_path / "compatibility.md"
    pyproject.write_text((root / "pyproject.toml").read_text())
    table.write_text((root / "docs" / "compatibility.md").read_text())
    monkeypatch.setattr(deps, "PYPROJECT", pyproject)
    monkeypatch.setattr(deps, "COMPATIBILITY", table)

    before = deps.declared()
    old_text = deps.set_upper_bound("transformers", "9.9.9")
    after = deps.declared()
    assert after["transformers"] == "transformers>=5.6,<=9.9.9"
    assert {k: v for k, v in after.items() if k != "transformers"} == {k: v for k, v in before.items() if k != "transformers"}
    assert old_text == (root / "pyproject.toml").read_text() and deps.lowest("transformers") == "5.6"
    versions = dict.fromkeys(deps.REPORTED, "1.0")
    deps.record(versions, "whole suite", "3 passed")
    assert "| 1.0 | 1.0 | 1.0 | 1.0 | whole suite | 3 passed |\n" + deps.TABLE_END in table.read_text()
