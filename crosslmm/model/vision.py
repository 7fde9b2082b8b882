"""Frame encoder: a transformers SigLIP, SigLIP2 or CLIP vision model applied frame by frame.

The tower is built with only the layers the model reads: the features come from
`vision_feature_layer` (LLaVA-OneVision: the second to last layer, before the
post-layernorm), so the layers after it, the post-layernorm and SigLIP's pooling head
would be dead weight and dead compute. Frames are encoded in chunks of
`vision_chunk_size` so a 256-frame video never holds 256 frames of ViT activations.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModel

from crosslmm.model.configuration import CrossLMMConfig


class VisionTower(nn.Module):
    def __init__(self, config: CrossLMMConfig) -> None:
        super().__init__()
        vision_config = copy.deepcopy(config.vision_config)
        vision_config.num_hidden_layers = config.num_vision_layers_used
        vision_config.vision_use_head = False  # SigLIP's pooling head (older configs lack the attribute)
        self.vit = AutoModel.from_config(vision_config)
        if not isinstance(getattr(self.vit, "post_layernorm", None), nn.LayerNorm):
            raise ValueError(
                f"{type(self.vit).__name__} in this transformers version has no top-level post_layernorm; "
                "crosslmm needs the vision model layout of transformers >= 5.6"
            )
        self.vit.post_layernorm = nn.Identity()
        self.model_type = vision_config.model_type
        self.patch_size = vision_config.patch_size
        self.grid_size = config.vision_grid_size
        self.image_size = config.image_size
        self.chunk_size = config.vision_chunk_size
        # Training the ViT with activation checkpointing: keep only each chunk's input
        # frames and recompute the chunk's encode in backward, instead of every layer's
        # input for every frame (26 layers x 729 tokens x 1152 per frame for
        # SigLIP-so400m, which is what made 512 frames not fit). The ViT's per-layer
        # checkpoints stay on inside the recompute: without them one chunk of 16 frames
        # would hold all 26 layers' activations at once (~17 GB in bf16 for so400m);
        # with them, 26 layer inputs of one chunk and one layer's activations. The price
        # is one more ViT forward per step. Set by the trainer.
        self.checkpoint_chunks = False

    @property
    def original_tokens_per_frame(self) -> int:
        """N, the ViT's patch tokens per frame (729 for SigLIP at 384 px), before pooling."""
        return self.grid_size * self.grid_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(F, 3, H, W) normalised frames -> (F, N, Dv) patch features, N = grid * grid."""
        expected = (3, self.image_size, self.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (num_frames, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(pixel_values.shape)}"
            )
        dtype = next(self.vit.parameters()).dtype
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.vit.parameters())
        encode = partial(checkpoint, self._encode, use_reentrant=False) if trains and self.checkpoint_chunks else self._encode
        # A frozen ViT runs without autograd: its per-layer checkpoints would otherwise keep
        # every layer's input alive until backward for nothing (measured: 44 of the 104 MB
        # a `reduced` stage-1 step kept after its forward at 8 frames).
        with torch.no_grad() if not trains else nullcontext():
            chunks = [encode(chunk.to(dtype)) for chunk in pixel_values.split(self.chunk_size)]
        return torch.cat(chunks) if len(chunks) > 1 else chunks[0]

    def _encode(self, frames: torch.Tensor) -> torch.Tensor:
        if self.model_type == "siglip2_vision_model":
            return self._encode_naflex(frames)
        hidden = self.vit(pixel_values=frames).last_hidden_state
        if self.model_type == "clip_vision_model":
            hidden = hidden[:, 1:]  # drop CLS: LLaVA's "patch" feature selection
        return hidden

    def _encode_naflex(self, frames: torch.Tensor) -> torch.Tensor:
        """SigLIP2 NaFlex takes patch sequences; a fixed square grid makes it a plain ViT."""
        num_frames, channels, _, _ = frames.shape
        grid, patch = self.grid_size, self.patch_size
        # (F, C, gh, p, gw, p) -> (F, gh, gw, p, p, C): the patch order of Siglip2ImageProcessor.
        patches = frames.reshape(num_frames, channels, grid, patch, grid, patch).permute(0, 2, 4, 3, 5, 1)
        patches = patches.reshape(num_frames, grid * grid, patch * patch * channels)
        spatial_shapes = torch.tensor([[grid, grid]], device=frames.device).expand(num_frames, 2)
        mask = torch.ones(num_frames, grid * grid, dtype=torch.long, device=frames.device)
        return self.vit(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=spatial_shapes).last_hidden_state
