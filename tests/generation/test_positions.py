"""The drafter places every token where the target does: its rotary positions equal the target's own
position ids (3-D M-RoPE for Qwen2.5-VL / Qwen3-VL: temporal, height, width per visual token, text
continuing after the image's largest index) for the prompt tokens it keeps after visual-token
compression (at their original positions), its drafted tokens, tree nodes and catch-up tokens, in
batches with left padding too; and a position bug of the kind serving engines have (drafts shifted
by the pruned tokens, or 1-D positions that ignore the rope deltas) fails the same check."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import build_drafter, cached_target

from hf_dream import DreamDraftModel
from hf_dream.generation import drafter_state
from hf_dream.generation.tree import tree_generate
from hf_dream.targets import TargetAdapter, TargetPositions
from hf_dream.testing import MROPE_TINY_FAMILIES, make_tiny_inputs, stack_tiny_inputs, tiny_inputs_row

NEW_TOKENS = 12
CASES = {
    "image_first": dict(image_first=True, text_len_before=0),
    "image_middle": dict(),
    "two_images": dict(num_images=2, text_len_before=2),
    "video": dict(num_images=0, num_videos=1),
    "text_only": dict(num_images=0),
}
# M-RoPE, and the 1-D families with adapters of their own (positions stay what they were; Gemma 4: two rotaries)
FAMILIES = [*MROPE_TINY_FAMILIES, "llava", "mistral3", "llava_onevision", "internvl", "gemma4"]


class PositionRecordingDraftModel(DreamDraftModel):
    """A real drafter that records, per forward, each column's sequence index, rotary positions, whether
    the column is real (not padding) and which input batch row each forward row is."""

    calls: list | None = None

    def forward(self, inputs_embeds, position_ids, *args, rotary_position_ids=None, attention_mask=None, **kwargs):
        rotary = position_ids if rotary_position_ids is None else rotary_position_ids
        rotary = rotary[None] if rotary.ndim == 2 else rotary
        length = position_ids.shape[1]
        real = torch.ones_like(position_ids, dtype=torch.bool) if attention_mask is None else attention_mask[:, -length:].bool()
        rows = list(self.batch_rows) if self.batch_rows is not None else [0] * position_ids.shape[0]
        self.calls.append((position_ids.clone(), rotary.clone(), real.clone(), rows))
        return super().forward(inputs_embeds, position_ids, *args, rotary_position_ids=rotary_position_ids, attention_mask=attention_mask, **kwargs)


@contextlib.contextmanager
def recorded_target_positions(target):
    """Records the position ids every forward of the target's text model hands its rotary embedding, `(axes, n)` (batch of one)."""
    seen = []
    first_layer_type = (getattr(target.config.get_text_config(), "layer_types", None) or [None])[0]

    def hook(module, args, kwargs):
        layer_type = kwargs.get("layer_type", args[2] if len(args) > 2 else None)
        if layer_type is not None and layer_type != first_layer_type:
            return  # Gemma 4: one rotary call per layer type and forward, all with the same positions
        positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        seen.append((positions[None] if positions.ndim == 2 else positions)[:, 0].clone())

    handle = target.get_decoder().rotary_emb.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def plain_positions(target, row_inputs: dict, steps: int) -> torch.Tensor:
    """`(axes, width + steps)`: the target's position of every sequence index in plain greedy decoding."""
    with recorded_target_positions(target) as seen:
        target.generate(**row_inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return torch.cat(seen, dim=-1)


def case_inputs(family: str, case: str, batched: bool) -> tuple[dict, list[dict]]:
    target = cached_target(family)
    kwargs = CASES[case]
    if not batched:
        inputs = make_tiny_inputs(target, seed=4, **kwargs)
        return inputs, [inputs]
    if case == "image_first":  # rows of different lengths: one image-first prompt, one image-middle prompt
        rows = [make_tiny_inputs(target, seed=4, image_first=True, text_len_before=0), make_tiny_inputs(target, seed=5, text_len_before=3)]
        return stack_tiny_inputs(target, rows), rows
    batch = make_tiny_inputs(target, seed=4, batch_size=2, **kwargs)
    return batch, [tiny_inputs_row(target, batch, r) for r in range(2)]


def run_mode(mode: str, target, inputs: dict, drafter) -> None:
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    if mode == "tree":
        target.generate(**inputs, custom_generate=tree_generate, drafter=drafter, tree_top_k=3, tree_depth=3, tree_total_tokens=8, **greedy)
    else:
        target.generate(**inputs, assistant_model=drafter, **greedy)


def check_drafter_positions(family: str, case: str, mode: str) -> dict[str, int]:
    """Runs the mode and asserts every real drafter column sits at the target's own position for its
    sequence index; returns how many prompt / later columns were checked."""
    target = cached_target(family)
    inputs, rows = case_inputs(family, case, batched=mode == "batch")
    truth = [plain_positions(target, row, NEW_TOKENS + 8) for row in rows]
    torch.manual_seed(0)
    drafter = build_drafter(PositionRecordingDraftModel, target, num_draft_tokens=3)
    drafter.calls = []
    run_mode(mode, target, inputs, drafter)
    widths = [row["input_ids"].shape[1] for row in rows]
    checked = {"prompt": 0, "after_prompt": 0}
    for indices, rotary, real, batch_rows in drafter.calls:
        for i, row in enumerate(batch_rows):
            for column in real[i].nonzero().squeeze(-1).tolist():
                index = int(indices[i, column])
                expected = truth[row][:, index]
                assert torch.equal(rotary[:, i, column], expected), (
                    f"row {row}, sequence index {index}: drafter at {rotary[:, i, column].tolist()}, target at {expected.tolist()}"
                )
                checked["prompt" if index < widths[row] else "after_prompt"] += 1
    stats = drafter.last_stats
    if CASES[case].get("num_images", 1) or CASES[case].get("num_videos"):
        visual = stats["rows"][0] if "rows" in stats else stats
        assert visual["visual_tokens_kept"] < visual["visual_tokens"]  # compression dropped some: kept ones keep their positions
    return checked


@pytest.mark.parametrize("mode", ["chain", "tree", "batch"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_the_drafter_uses_the_targets_positions(family, case, mode):
    if case == "video" and family not in MROPE_TINY_FAMILIES:
        pytest.skip("no video inputs")
    checked = check_drafter_positions(family, case, mode)
    assert checked["prompt"] > 0 and checked["after_prompt"] > NEW_TOKENS // 2


def test_m_rope_positions_are_3d_and_text_continues_after_the_image():
    """Hand-checked: an image-first Qwen2.5-VL prompt (grid 1 x 4 x 8 patches, merged 2 x 2: 2 rows of 4
    tokens) puts its tokens at t = 0, h = row, w = column; the text after it continues from
    max(h, w) = 4, so tokens after the prompt sit 4 positions before their sequence index."""
    target = cached_target("qwen2_5_vl")
    inputs = make_tiny_inputs(target, seed=4, image_first=True, text_len_before=0)
    adapter = DreamDraftModel.from_target(target).target_adapter
    positions = adapter.target_positions(inputs["input_ids"], inputs["attention_mask"].bool(), inputs)
    image = positions.prompt[:, 0, :8]
    assert image.tolist() == [[0] * 8, [0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert positions.prompt[:, 0, 8].tolist() == [4, 4, 4]  # <vision_end>, the first text token
    assert positions.deltas[:, 0].tolist() == [-4, -4, -4]
    assert torch.equal(positions.prompt, plain_positions(target, inputs, 1)[:, None])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_the_drafters_rotary_is_the_targets_m_rope(family):
    """Same cos/sin as the target's own rotary embedding for 3-D positions (chunked or interleaved sections)."""
    target = cached_target(family)
    drafter = DreamDraftModel.from_target(target)
    positions = torch.randint(0, 50, (3, 2, 7))
    hidden = torch.zeros(2, 7, drafter.config.hidden_size)
    for mine, theirs in zip(drafter.rotary_emb(hidden, positions), target.get_decoder().rotary_emb(hidden, positions)):
        assert torch.equal(mine, theirs)
    text = positions[0]  # 2-D positions: equal on every axis
    for mine, theirs in zip(drafter.rotary_emb(hidden, text), target.get_decoder().rotary_emb(hidden, text[None].expand(3, -1, -1))):
        assert torch.equal(mine, theirs)


def _shift_drafts_by_pruned_tokens(monkeypatch):
    """vLLM's pruning bug: drafted tokens written at positions shifted by the number of pruned visual tokens."""
    prefill = drafter_state.DrafterState.prefill

    def shifted(self, *args, **kwargs):
        output = prefill(self, *args, **kwargs)
        pruned = torch.tensor([v - k for v, k in zip(self.visual_tokens, self.visual_tokens_kept)])
        self.positions = TargetPositions(self.positions.prompt, self.positions.deltas - pruned.to(self.positions.deltas.device))
        return output

    monkeypatch.setattr(drafter_state.DrafterState, "prefill", shifted)


def _ignore_rope_deltas(monkeypatch):
    """vLLM's image-first bug: the drafter takes the 1-D sequence index (every image token one position) instead of M-RoPE."""

    def one_dimensional(self, input_ids, prompt_mask, model_kwargs):
        prompt = TargetAdapter.rotary_position_ids(self, input_ids, prompt_mask, {})
        return TargetPositions.from_prompt(prompt.to(input_ids.device), prompt_mask)

    monkeypatch.setattr(TargetAdapter, "target_positions", one_dimensional)


@pytest.mark.parametrize("bug", [_shift_drafts_by_pruned_tokens, _ignore_rope_deltas])
@pytest.mark.parametrize("mode", ["chain", "batch"])
def test_a_serving_engine_position_bug_fails_the_check(bug, mode, monkeypatch):
    bug(monkeypatch)
    with pytest.raises(AssertionError, match="drafter at"):
        check_drafter_positions("qwen2_5_vl", "image_first", mode)
