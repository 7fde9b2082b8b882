"""Two-stage CrossLMM training: recipes (config.py), the loop (trainer.py), checkpoints (state.py), feature cache."""
