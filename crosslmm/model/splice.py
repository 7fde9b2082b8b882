"""Where every token goes: expanding one placeholder per media item into its pooled tokens.

`input_ids` carry one `media_token_id` per media item (a video, or an image as a 1-frame
video). The model, not the processor, expands it into `frames * tokens_per_frame`
positions, because tokens per frame is a model option (config.json) and must not be
able to disagree with the processor. The expansion is computed once per forward as
index tensors (no Python loop over samples or frames), and the same layout tells the
DCAL layers which positions are visual, which are text, and which media precede each
text token.

Padding is removed and re-applied after expansion, on the side the input used, so a
left-padded generation batch stays left-padded and every sample gets the positions it
would have alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crosslmm.model.dcal import CrossAttentionGroups

IGNORE_INDEX = -100


@dataclass
class SequenceLayout:
    length: int  # L', the expanded, re-padded length
    attention_mask: torch.Tensor  # (B, L') long
    position_ids: torch.Tensor  # (B, L') long
    labels: torch.Tensor | None  # (B, L') long, IGNORE_INDEX at visual tokens and padding
    text_source: torch.Tensor  # (n_text,) flat index into the input (B*L)
    text_target: torch.Tensor  # (n_text,) flat index into the output (B*L')
    visual_target: torch.Tensor  # (F*g*g,) flat index into the output, frame-major
    newline_target: torch.Tensor  # (M * tokens_after_media,) flat index of each media item's trailing token
    v2v: CrossAttentionGroups | None
    t2v: CrossAttentionGroups | None
    frames_per_sample: torch.Tensor  # (B,)


def infer_padding_side(attention_mask: torch.Tensor | None) -> str:
    """"left" when some row starts with padding, else "right"."""
    if attention_mask is not None and bool((attention_mask[:, 0] == 0).any()):
        return "left"
    return "right"


def build_layout(
    input_ids: torch.Tensor,  # (B, L)
    attention_mask: torch.Tensor | None,  # (B, L) 1 = token, 0 = padding
    labels: torch.Tensor | None,  # (B, L)
    media_num_frames: torch.Tensor,  # (M,) frames of each media item, in placeholder order
    *,
    media_token_id: int,
    pooled_tokens_per_frame: int,  # g*g
    v2v_scope: str,
    tokens_after_media: int = 0,  # 1: LLaVA-OV's newline after each media item
    max_length: int | None,
    padding_side: str,
) -> SequenceLayout:
    device = input_ids.device
    batch, length = input_ids.shape
    g2 = pooled_tokens_per_frame
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    is_media = (input_ids == media_token_id) & valid
    media_num_frames = media_num_frames.to(device=device, dtype=torch.long)

    num_placeholders = int(is_media.sum())
    if bool(((input_ids == media_token_id) & ~valid).any()):
        raise ValueError("a media placeholder token sits in a padding position (attention_mask = 0)")
    if num_placeholders != media_num_frames.numel():
        raise ValueError(
            f"input_ids hold {num_placeholders} media placeholder(s) (token id {media_token_id}) but "
            f"{media_num_frames.numel()} media item(s) were given; each media item needs exactly one placeholder"
        )
    if bool((media_num_frames < 1).any()):
        raise ValueError(f"every media item needs at least one frame, got media_num_frames={media_num_frames.tolist()}")

    # Width of every input token after expansion: 1 for text, T*g2 (+ newline) for a placeholder, 0 for padding.
    frame_width = media_num_frames * g2
    media_width = frame_width + tokens_after_media
    width = valid.long()
    width[is_media] = media_width
    new_lengths = width.sum(dim=1)  # (B,)
    new_length = int(new_lengths.max()) if batch else 0
    if max_length is not None and new_length > max_length:
        sample = int(new_lengths.argmax())
        raise ValueError(
            f"sample {sample} is {new_length} tokens long after splicing its media "
            f"({int((width * is_media)[sample].sum())} of them visual), "
            f"more than the language model's context of {max_length}; use fewer frames, fewer tokens per "
            f"frame or a shorter prompt (nothing is truncated silently)"
        )

    offset = (new_length - new_lengths) if padding_side == "left" else torch.zeros_like(new_lengths)
    start = torch.cumsum(width, dim=1) - width + offset[:, None]  # (B, L) first output position of each token
    row = torch.arange(batch, device=device)[:, None].expand(batch, length)
    target = row * new_length + start  # flat output position of each input token

    is_text = valid & ~is_media
    text_source = torch.nonzero(is_text.reshape(-1), as_tuple=True)[0]
    text_target = target.reshape(-1)[text_source]

    # Visual tokens of media m fill [start_m, start_m + T_m*g2) of its row, frame-major;
    # a newline token, if any, follows at start_m + T_m*g2.
    media_start = target[is_media]  # (M,) in row-major placeholder order = media order
    total_visual = int(frame_width.sum())
    first_visual_of_media = torch.cumsum(frame_width, 0) - frame_width
    within = torch.arange(total_visual, device=device) - torch.repeat_interleave(first_visual_of_media, frame_width)
    visual_target = torch.repeat_interleave(media_start, frame_width) + within
    newline_target = (media_start + frame_width) if tokens_after_media else media_start[:0]

    out_mask = torch.zeros(batch * new_length, dtype=torch.long, device=device)
    out_mask[text_target] = 1
    out_mask[visual_target] = 1
    out_mask[newline_target] = 1
    out_mask = out_mask.view(batch, new_length)
    position_ids = (out_mask.cumsum(dim=1) - 1).masked_fill(out_mask == 0, 1)

    out_labels = None
    if labels is not None:
        out_labels = torch.full((batch * new_length,), IGNORE_INDEX, dtype=labels.dtype, device=device)
        out_labels[text_target] = labels.reshape(-1)[text_source]
        out_labels = out_labels.view(batch, new_length)

    # Frames: media in placeholder order, so each sample's frames form one contiguous range.
    frames_at = torch.zeros_like(input_ids)
    frames_at[is_media] = media_num_frames
    frames_per_sample = frames_at.sum(dim=1)
    num_frames = int(media_num_frames.sum())
    v2v = t2v = None
    if num_frames:
        v2v = _v2v_groups(visual_target, media_num_frames, g2, v2v_scope)
        t2v = _t2v_groups(is_text, target, frames_at, frames_per_sample)

    return SequenceLayout(
        length=new_length,
        attention_mask=out_mask,
        position_ids=position_ids,
        labels=out_labels,
        text_source=text_source,
        text_target=text_target,
        visual_target=visual_target,
        newline_target=newline_target,
        v2v=v2v,
        t2v=t2v,
        frames_per_sample=frames_per_sample,
    )


def _v2v_groups(visual_target: torch.Tensor, media_num_frames: torch.Tensor, g2: int, scope: str) -> CrossAttentionGroups:
    device = visual_target.device
    num_frames = int(media_num_frames.sum())
    if scope == "frame":  # frame f's g2 pooled tokens see frame f's originals
        query_index = visual_target.view(num_frames, g2)
        key_frames = torch.arange(num_frames, device=device)[:, None]
        return CrossAttentionGroups(query_index, key_frames, torch.ones_like(query_index))

    # video scope: media m's T_m*g2 pooled tokens see all T_m frames' originals
    max_frames = int(media_num_frames.max())
    first_frame = torch.cumsum(media_num_frames, 0) - media_num_frames
    slot = torch.arange(max_frames, device=device)[None, :]
    frame_valid = slot < media_num_frames[:, None]  # (M, Tmax)
    key_frames = torch.where(frame_valid, first_frame[:, None] + slot, -1)
    token_valid = frame_valid.repeat_interleave(g2, dim=1)  # (M, Tmax*g2)
    query_index = torch.full(token_valid.shape, -1, dtype=torch.long, device=device)
    query_index[token_valid] = visual_target
    visible = torch.where(token_valid, media_num_frames[:, None], 0)
    return CrossAttentionGroups(query_index, key_frames, visible)


def _t2v_groups(is_text: torch.Tensor, target: torch.Tensor, frames_at: torch.Tensor, frames_per_sample: torch.Tensor) -> CrossAttentionGroups:
    """One group per sample: its text tokens see the frames of the media placed before them."""
    device = is_text.device
    batch = is_text.shape[0]
    rank = is_text.long().cumsum(dim=1) - 1  # index of each text token among its row's text tokens
    max_text = int(is_text.sum(dim=1).max())
    query_index = torch.full((batch, max_text), -1, dtype=torch.long, device=device)
    visible = torch.zeros((batch, max_text), dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)[:, None].expand_as(is_text)
    frames_before = frames_at.cumsum(dim=1)  # a text token is never a placeholder: inclusive == exclusive
    query_index[rows[is_text], rank[is_text]] = target[is_text]
    visible[rows[is_text], rank[is_text]] = frames_before[is_text]

    max_frames = int(frames_per_sample.max())
    first_frame = torch.cumsum(frames_per_sample, 0) - frames_per_sample
    slot = torch.arange(max_frames, device=device)[None, :]
    key_frames = torch.where(slot < frames_per_sample[:, None], first_frame[:, None] + slot, -1)
    return CrossAttentionGroups(query_index, key_frames, visible)
