"""Getting weights into CrossLMM: assemble from local checkpoints, import LLaVA-OneVision, count parameters."""

from crosslmm.checkpoints.assemble import CheckpointError, assemble, read_config_json
from crosslmm.checkpoints.build import build
from crosslmm.checkpoints.llava_onevision import import_llava_onevision
from crosslmm.checkpoints.params import count_parameters

__all__ = ["CheckpointError", "assemble", "build", "count_parameters", "import_llava_onevision", "read_config_json"]
