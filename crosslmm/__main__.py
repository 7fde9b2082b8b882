"""`python -m crosslmm ...` is the `crosslmm` command (what torchrun launches)."""

from crosslmm.cli import app

app()
