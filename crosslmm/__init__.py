"""crosslmm: CrossLMM video language models on Hugging Face transformers."""

from transformers import AutoConfig, AutoModelForCausalLM

from crosslmm.model import CrossLMMConfig, CrossLMMForCausalLM, CrossLMMOutput

__version__ = "0.1.0"

# Let transformers' Auto classes load a CrossLMM checkpoint directory by its model_type.
AutoConfig.register(CrossLMMConfig.model_type, CrossLMMConfig, exist_ok=True)
AutoModelForCausalLM.register(CrossLMMConfig, CrossLMMForCausalLM, exist_ok=True)

__all__ = ["CrossLMMConfig", "CrossLMMForCausalLM", "CrossLMMOutput", "__version__"]
