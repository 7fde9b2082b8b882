"""lmms-eval's plugin hook (the package name `models` is lmms-eval's convention, not
ours: our model code is `crosslmm.model`).

- lmms-eval v0.3.x: `LMMS_EVAL_PLUGINS=crosslmm` imports this module and reads
  `AVAILABLE_MODELS` (model name -> class in `crosslmm.models.<name>`).
- lmms-eval 0.7.x: the entry point `crosslmm = "crosslmm.models:lmms_eval_manifest"` in
  the `lmms_eval.models` group (pyproject.toml).

Then `python -m lmms_eval --model crosslmm --model_args pretrained=DIR,max_frames_num=32
--tasks mvbench ...` (docs/evaluation.md).
"""

AVAILABLE_MODELS = {"crosslmm": "CrossLMM"}


def lmms_eval_manifest():
    """The entry-point payload of lmms-eval 0.7.x: a ModelManifest for `crosslmm`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="crosslmm", simple_class_path="crosslmm.models.crosslmm.CrossLMM")
