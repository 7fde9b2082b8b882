"""The CrossLMM model: one component per file, assembled in modeling.py."""

from crosslmm.model.configuration import CrossLMMConfig
from crosslmm.model.modeling import CrossLMMForCausalLM, CrossLMMOutput, CrossLMMPreTrainedModel

__all__ = ["CrossLMMConfig", "CrossLMMForCausalLM", "CrossLMMOutput", "CrossLMMPreTrainedModel"]
