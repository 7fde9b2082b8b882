"""The T2V grounding loss (crosslmm.train.grounding) and the world's grounding targets.

The loss must measure what `crosslmm demo` shows (the same recomputed softmax), pick the
query that predicts each answer, and teach T2V to look at the targets faster than the
answer tokens alone do; the world's targets must be the sprite a question is about.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from test_learning import BATCH, MEDIA, QUESTION, toy_model

from crosslmm.synth.world import (
    COLORS,
    REGIONS,
    Balancer,
    add_grounding,
    grounding_targets,
    letter_hop_records,
    make_questions,
    multiturn_records,
    region_box,
    render,
    scene_for,
)
from crosslmm.train.grounding import T2VAttentionMass, grounded_answer_tokens, grounded_queries, option_line_ends

FIRST, FRAMES = 10, 2


def test_grounded_queries_are_the_text_tokens_before_each_answer():
    # row 0: <m> q q A A q A ; row 1: q <m> q A pad pad pad
    ids = torch.tensor([[MEDIA, 5, 6, 40, 41, 7, 42], [5, MEDIA, 6, 43, 0, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 40, 41, -100, 42], [-100, -100, -100, 43, -100, -100, -100]])
    batch = {"input_ids": ids, "labels": labels, "grounding": [[[3, 4], None], [[9]]]}
    # row 0: answer 1 starts at 3, predicted from position 2 = text rank 1 (one placeholder before);
    # its second answer has no target. Row 1: position 2, text rank 1.
    assert grounded_queries(batch, MEDIA) == [(0, 1, [[3, 4]]), (1, 1, [[9]])]
    assert grounded_queries({**batch, "grounding": [None, None]}, MEDIA) == []
    # head groups pass through as they are
    grouped = {**batch, "grounding": [[[[3], [4, 5]], None], None]}
    assert grounded_queries(grouped, MEDIA) == [(0, 1, [[3], [4, 5]])]
    # the read-out loss's targets: each grounded answer's first token, by its query
    assert grounded_answer_tokens(batch, MEDIA) == {(0, 1): 40, (1, 1): 43}


def test_the_readout_loss_reads_t2vs_update_through_the_fixed_norm_and_head():
    """The cross entropy of the answer's first token from each T2V layer's update at the
    answer's query, as the language model would read it as its last hidden state; the
    norm and the head get no gradient from it, T2V does."""
    torch.manual_seed(0)
    model = toy_model(use_v2v=False, use_t2v=True).train()
    with torch.no_grad():
        for layer in model.decoder_layers:
            if getattr(layer, "t2v", None) is not None:
                torch.nn.init.normal_(layer.t2v.o_proj.weight, std=0.1)  # open blocks: a nonzero update
    pattern = torch.randn(8, model.config.vision_config.hidden_size, generator=torch.Generator().manual_seed(1)) * 3
    ids, labels, features, place = _toy_batch(torch.Generator().manual_seed(3), model, pattern)
    batch = {"input_ids": ids, "labels": labels, "grounding": [[[int(p)]] for p in place]}
    updates = []  # per T2V call, (G, Lq, D)
    hooks = [layer.t2v.register_forward_hook(lambda _m, _a, out: updates.append(out))
             for layer in model.decoder_layers if getattr(layer, "t2v", None) is not None]
    answers = grounded_answer_tokens(batch, MEDIA)
    with T2VAttentionMass(model, grounded_queries(batch, MEDIA), answers) as mass:
        model(ids, labels=labels, vision_features=features, media_num_frames=torch.full((BATCH,), FRAMES))
    for hook in hooks:
        hook.remove()
    norm, head = model.language_model.model.norm, model.get_output_embeddings()
    loss = mass.readout_loss(norm, head.weight)
    # one group per sample, the question token its only text query before the answer (rank 0)
    assert sorted(answers) == [(b, 0) for b in range(BATCH)] and len(updates) > 0
    read = torch.cat([u[:, 0] for u in updates])  # (layers * B, D), layer by layer
    expected = torch.nn.functional.cross_entropy(head(norm(read)), torch.cat([ids[:, 2]] * len(updates)))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert norm.weight.grad is None and head.weight.grad is None
    assert all(layer.t2v.v_proj.weight.grad is not None for layer in model.decoder_layers
               if getattr(layer, "t2v", None) is not None)


def test_grounding_options_adds_each_option_lines_last_token():
    # two turns: a short question, then a multiple-choice one; texts index token ids
    texts = ["<pad>", "<m>", "Q", "?", "\n", "A", ".", " left", "B", " does", " not", " move", "Answer", " x", " (", ")"]
    tid = {t: i for i, t in enumerate(texts)}
    prompt1 = ["<m>", "Q", "?", "\n", "Answer"]
    answer1 = [" x"]
    prompt2 = ["\n", "Q", "?", "\n", "A", ".", " left", "\n", "B", ".", " does", " not", " move", "\n", "Answer"]
    answer2 = [" left", " (", "A", ")"]
    tokens = prompt1 + answer1 + prompt2 + answer2
    ids = torch.tensor([[tid[t] for t in tokens]])
    labels = torch.tensor([[tid[t] if i in range(5, 6) or i >= 21 else -100 for i, t in enumerate(tokens)]])
    media = tid["<m>"]
    batch = {"input_ids": ids, "labels": labels, "grounding": [[[7], [[1], [2]]]]}
    plain = grounded_queries(batch, media)
    assert plain == [(0, 3, [[7]]), (0, 19, [[1], [2]])]  # text ranks: one placeholder before
    with_options = grounded_queries(batch, media, texts)
    # the first prompt has no option line; the second's end at " left" (12) and " move" (18)
    assert with_options == [(0, 3, [[7]]), (0, 19, [[1], [2]]), (0, 11, [[1], [2]]), (0, 17, [[1], [2]])]
    # an ungrounded multiple-choice answer grounds none of its options
    assert grounded_queries({**batch, "grounding": [[[7], None]]}, media, texts) == [(0, 3, [[7]])]


def test_option_lines_are_found_in_the_prompts_the_world_writes():
    # `grounding_options` finds option lines by their text ("B. red"): a change to how the
    # world (or the benchmarks) lay out options must fail here, not silently ground nothing
    for record in letter_hop_records(3, 40, mc_reply="option-letter"):
        prompt, options = record["conversations"][0]["value"], record["questions"][0]["options"]
        ends = option_line_ends(list(prompt))  # one character per token: an index is a character's
        assert len(ends) == len(options)
        for end, option, letter in zip(ends, options, "ABCD"):
            assert prompt[: end + 1].endswith(f"\n{letter}. {option}")


def _toy_batch(generator: torch.Generator, model, pattern: torch.Tensor):
    """A pattern at one random original of a 2-frame video (frames re-centred to a zero
    pooled token); the answer token says which of 8 contents it had. Returns ids,
    labels, features and each sample's (frame * N + token) place."""
    n, width = model.config.vision_grid_size ** 2, model.config.vision_config.hidden_size
    classes = torch.randint(0, pattern.shape[0], (BATCH,), generator=generator)
    place = torch.randint(0, FRAMES * n, (BATCH,), generator=generator)
    features = torch.randn(BATCH, FRAMES * n, width, generator=generator)
    features[torch.arange(BATCH), place] += pattern[classes]
    features = features.view(BATCH, FRAMES, n, width)
    features = features - features.mean(dim=2, keepdim=True)
    rows = torch.arange(BATCH)
    ids = torch.stack([torch.full_like(rows, MEDIA), torch.full_like(rows, QUESTION), FIRST + classes], dim=1)
    labels = ids.clone()
    labels[:, :2] = -100
    return ids, labels, features.reshape(BATCH * FRAMES, n, width), place


def _train(steps: int, weight: float) -> tuple[list[float], list[float]]:
    """Token losses and (mean over layers and samples) attention masses on the pattern."""
    torch.set_num_threads(1)
    model = toy_model(use_v2v=False, use_t2v=True).train()
    width = model.config.vision_config.hidden_size
    pattern = torch.randn(8, width, generator=torch.Generator().manual_seed(1)) * 3
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator, losses, masses = torch.Generator().manual_seed(2), [], []
    for _ in range(steps):
        ids, labels, features, place = _toy_batch(generator, model, pattern)
        batch = {"input_ids": ids, "labels": labels, "grounding": [[[int(p)]] for p in place]}
        with T2VAttentionMass(model, grounded_queries(batch, MEDIA)) as mass:
            out = model(ids, labels=labels, vision_features=features, media_num_frames=torch.full((BATCH,), FRAMES))
        loss = out.loss + weight * mass.loss() if weight else out.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        masses.append(torch.cat(mass.masses).mean().item())
    return losses, masses


def test_the_grounding_loss_teaches_t2v_where_to_look_before_the_answers_do():
    """Without it, T2V's attention on the one original that holds the answer stays near
    uniform (1 of 2 x 49 originals) for the first ~40 steps and wanders after (about
    0.1-0.3 by step 120); with it the attention is on that original within 20 steps, and
    the answer loss falls sooner (by step 120: about 1.1 against 1.6; log 8 is chance)."""
    plain_losses, plain_masses = _train(120, weight=0.0)
    grounded_losses, grounded_masses = _train(120, weight=1.0)
    assert np.mean(plain_masses[20:30]) < 0.05
    assert np.mean(grounded_masses[20:30]) > 0.9, np.mean(grounded_masses[20:30])
    assert np.mean(grounded_masses[-10:]) > 0.9 > np.mean(plain_masses[-10:]) + 0.4
    assert np.mean(grounded_losses[-10:]) < 0.85 * np.mean(plain_losses[-10:]), (
        np.mean(grounded_losses[-10:]), np.mean(plain_losses[-10:]))


def test_the_measured_mass_is_the_demos_attention_on_the_targets():
    from crosslmm.synth.demo import t2v_attention

    torch.manual_seed(0)
    model = toy_model(use_v2v=False, use_t2v=True).eval()
    with torch.no_grad():
        for layer in model.decoder_layers:
            if getattr(layer, "t2v", None) is not None:
                torch.nn.init.normal_(layer.t2v.o_proj.weight, std=0.1)  # open blocks: later layers see earlier ones
    pattern = torch.randn(8, model.config.vision_config.hidden_size, generator=torch.Generator().manual_seed(1)) * 3
    ids, labels, features, place = _toy_batch(torch.Generator().manual_seed(3), model, pattern)
    sample, targets = 5, [int(place[5]), 7, 60]
    batch = {"input_ids": ids, "labels": labels, "grounding": [None] * BATCH}
    batch["grounding"][sample] = [targets]
    with torch.no_grad(), T2VAttentionMass(model, grounded_queries(batch, MEDIA)) as mass:
        model(ids, labels=labels, vision_features=features, media_num_frames=torch.full((BATCH,), FRAMES))
    measured = torch.cat(mass.masses).mean()  # one query, mean over layers
    n = model.config.vision_grid_size ** 2
    shown = t2v_attention(model, {"input_ids": ids[sample:sample + 1], "attention_mask": torch.ones(1, 3, dtype=torch.long),
                                  "vision_features": features.view(BATCH, FRAMES, n, -1)[sample],
                                  "media_num_frames": torch.tensor([FRAMES])}, [1])  # (frames, grid, grid)
    torch.testing.assert_close(measured, shown.reshape(-1)[targets].sum())


def test_head_groups_each_measure_their_own_targets():
    """Two groups over T2V's heads: each head is measured on its group's targets, and the
    loss is the mean of the groups' -log masses (not of one pooled mass)."""
    torch.manual_seed(0)
    model = toy_model(use_v2v=False, use_t2v=True).eval()
    pattern = torch.randn(8, model.config.vision_config.hidden_size, generator=torch.Generator().manual_seed(1)) * 3
    ids, labels, features, _ = _toy_batch(torch.Generator().manual_seed(3), model, pattern)
    first, second = [0, 1, 2], [70, 71]
    probabilities = []  # per T2V call, (G, H, Lq, S)

    def keep(module, args, kwargs, output):
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        inputs = bound.arguments
        probabilities.append(module.probabilities(inputs["hidden"], inputs["key"], inputs["key_mask"]))

    hooks = [layer.t2v.register_forward_hook(keep, with_kwargs=True)
             for layer in model.decoder_layers if getattr(layer, "t2v", None) is not None]
    batch = {"input_ids": ids, "labels": labels, "grounding": [[[first, second]]] + [None] * (BATCH - 1)}
    (sample, rank, _), = grounded_queries(batch, MEDIA)
    with torch.no_grad(), T2VAttentionMass(model, grounded_queries(batch, MEDIA)) as mass:
        model(ids, labels=labels, vision_features=features, media_num_frames=torch.full((BATCH,), FRAMES))
    for hook in hooks:
        hook.remove()
    heads = probabilities[0].shape[1]
    assert heads % 2 == 0 and len(mass.masses) == len(probabilities) > 0
    expected_terms = []
    for layer_probs, measured in zip(probabilities, mass.masses):
        row = layer_probs[sample, :, rank]  # (H, S): one group per sample, its queries in text order
        own = torch.cat([row[:heads // 2, first].sum(-1), row[heads // 2:, second].sum(-1)])  # (H,)
        torch.testing.assert_close(measured, own.mean()[None])
        expected_terms += [own[:heads // 2].mean(), own[heads // 2:].mean()]
    torch.testing.assert_close(mass.loss(), -torch.stack(expected_terms).log().mean())
    three = {**batch, "grounding": [[[first, second, [5]]]] + [None] * (BATCH - 1)}
    with torch.no_grad(), T2VAttentionMass(model, grounded_queries(three, MEDIA)) as mass:
        model(ids, labels=labels, vision_features=features, media_num_frames=torch.full((BATCH,), FRAMES))
    with pytest.raises(ValueError, match="do not split"):
        mass.loss()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_world_targets_are_the_sprite_the_question_is_about(seed):
    scene = scene_for(seed, 3)
    questions = make_questions(scene, np.random.default_rng(seed), 12, Balancer())
    records = multiturn_records([{**q, "video": "videos/vid000003.mp4"} for q in questions])
    grounded = add_grounding(records, seed)[0]
    asked = [turn["value"] for turn in grounded["conversations"] if turn["from"] == "human"]
    assert len(grounded["grounding"]) == len(asked) == len(questions)
    frames = render(scene)  # (T, H, W, 3) uint8, before any encoding
    sprite_colours = np.array(list(COLORS.values()))  # (C, 3)
    cell, checked, checked_motion = scene.size // 8, 0, 0
    for question, targets in zip(asked, grounded["grounding"]):
        if "quadrant in frame" in question:
            region = next(r for r in REGIONS if f"the {r} quadrant" in question)
            t = int(question.split("frame ")[1][0]) - 1
            assert {i // 64 for i in targets} == {t}
            # The quadrant holds one sprite and no other touches it: the pixels of a sprite
            # colour inside it are that sprite's, and they lie in the target patches.
            x0, y0, x1, y1 = region_box(region, scene.size)
            crop = frames[t, y0:y1, x0:x1].astype(int)
            is_sprite = (np.abs(crop[:, :, None] - sprite_colours[None, None]).sum(-1) == 0).any(-1)
            ys, xs = np.nonzero(is_sprite)
            assert len(ys) > 20
            hit = {t * 64 + ((y + y0) // cell) * 8 + (x + x0) // cell for y, x in zip(ys, xs)}
            assert hit <= set(targets) and len(hit) >= len(targets) // 2
            checked += 1
        elif "What pattern does the" in question:
            obj = scene.find(question.split("does the ", 1)[1].split(" have?")[0])
            assert {i // 64 for i in targets} == set(range(obj.start, min(obj.end, scene.frames)))
        elif "Which direction does the" in question:  # two head groups: its first and its last frame
            obj = scene.find(question.split("does the ", 1)[1].split(" move?")[0])
            first, last = targets
            assert {i // 64 for i in first} == {obj.start} and {i // 64 for i in last} == {min(obj.end, scene.frames) - 1}
            checked_motion += 1
        elif "appears first" in question or "appears last" in question:  # the sprite in the frame it appears
            starts = [o.start for o in scene.objects]
            obj = scene.objects[starts.index(min(starts) if "first" in question else max(starts))]
            assert {i // 64 for i in targets} == {obj.start}
        elif "Which object has" in question or "the object with" in question:
            (obj,) = [o for o in scene.objects if f" {o.pattern}?" in question]
            assert {i // 64 for i in targets} == set(range(obj.start, min(obj.end, scene.frames)))
        elif "appear before the" in question:  # two head groups: each sprite where it appears
            a, b = (scene.find(name) for name in question.split("Does the ", 1)[1].split("?")[0].split(" appear before the "))
            assert [{i // 64 for i in group} for group in targets] == [{a.start}, {b.start}]
        else:
            assert "How many" in question and targets is None
    assert checked or seed, "seed 0's scene asks a quadrant question: the pixel check must run"
    assert checked_motion or seed, "seed 0's scene asks a motion question"
    assert grounding_targets(scene, "How many circles appear in the video?", 8) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_count_targets_are_every_counted_sprite_once_where_it_appears(seed):
    """`counts=True`: a count question's targets are each counted sprite's patches in the
    frame it appears, checked against the rendered pixels of that sprite's colour; a count
    of 0 has no target, and without the option counts stay ungrounded."""
    scene = scene_for(seed, 5)
    frames = render(scene)  # (T, H, W, 3) uint8
    cell, pixel_checked = scene.size // 8, 0
    plural = {"square": "squares", "circle": "circles", "triangle": "triangles", "cross": "crosses"}
    asked = ["How many objects appear in the video?",
             *(f"How many {plural[o.shape]} appear in the video?" for o in scene.objects),
             *(f"How many {o.color} objects appear in the video?" for o in scene.objects)]
    for question in asked:
        assert grounding_targets(scene, question, 8) is None
        targets = grounding_targets(scene, question + "\nA. 1\nB. 2", 8, counts=True)
        if question.startswith("How many objects"):
            counted = list(scene.objects)
        elif question.endswith("objects appear in the video?"):
            counted = [o for o in scene.objects if f" {o.color} objects" in question]
        else:
            counted = [o for o in scene.objects if f" {plural[o.shape]} " in question]
        assert counted and len(targets) == len(set(targets))
        for obj in counted:  # each counted sprite's own pixels, in its first frame, lie in the targets
            if sum(o.color == obj.color for o in scene.objects) > 1:
                continue  # its colour's pixels are not its own alone
            ys, xs = np.nonzero((frames[obj.start].astype(int) - np.array(COLORS[obj.color])).__abs__().sum(-1) == 0)
            assert len(ys) > 10
            hit = {obj.start * 64 + (y // cell) * 8 + x // cell for y, x in zip(ys, xs)}
            assert len(hit & set(targets)) >= len(hit) * 3 // 4
            pixel_checked += 1
        assert {i // 64 for i in targets} == {o.start for o in counted}
    assert pixel_checked, "no sprite of a colour of its own: the pixel check never ran"
    absent = next(c for c in COLORS if all(o.color != c for o in scene.objects))
    assert grounding_targets(scene, f"How many {absent} objects appear in the video?", 8, counts=True) is None
