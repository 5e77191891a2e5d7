"""The decoding contract, one suite for every mode: chain (`assistant_model=`, batch 1, through
transformers' assisted loop), tree (`custom_generate=tree_generate`), batch (a batch with
`assistant_model=`, routed to `batched_generate`) and batched tree (`tree_generate` on a batch),
x family x greedy / sampling.

Greedy output equals plain `generate` exactly (rows of a batch: plain batched generate, and each
prompt alone), including rounds with partial acceptance, side branches, EOS and max_new_tokens
inside a draft; sampling keeps the target's distribution (chi-square against the exact marginals
on a tiny vocabulary; with a stop string, every sample is cut where plain sampling stops and the
lengths follow too), and a deliberately wrong acceptance fails the same test in every mode.
Every mode's acceptance is the shared one (`engine.accept`; the chain's, transformers', agrees
with it)."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import pytest
import torch
from conftest import build_drafter, cached_target, check_stats

from hf_dream import DreamDraftModel
from hf_dream.generation import engine
from hf_dream.generation.candidate_generator import DreamCandidateGenerator
from hf_dream.generation.tree import tree_generate
from hf_dream.testing import build_tiny_target, build_tiny_tokenizer, make_tiny_inputs, stack_tiny_inputs, tiny_inputs_row

MODES = ["chain", "tree", "batch", "batched_tree"]
CUSTOM_MODES = ["tree", "batch", "batched_tree"]  # our own loops (the chain runs in transformers')
TREE_MODES = ["tree", "batched_tree"]
BATCH_MODES = ["batch", "batched_tree"]
TREE = dict(tree_top_k=4, tree_depth=5, tree_total_tokens=16)
NEW_TOKENS = 30


# --- cases and runs ------------------------------------------------------------------------------
def starting_with_the_image(image_first: bool) -> dict:
    """`make_tiny_inputs` options of a prompt whose very first token belongs to its image (none: text first)."""
    return dict(image_first=True, text_len_before=0) if image_first else {}


def ragged_rows(target, image_first: bool = False) -> list[dict]:
    """Three prompts of different text lengths; the second holds two images. `image_first`: the
    first two start with their image (right after the left padding), the third with text."""
    first = starting_with_the_image(image_first)
    return [
        make_tiny_inputs(target, seed=1, **first),
        make_tiny_inputs(target, seed=2, num_images=2, **(first or dict(text_len_before=2))),
        make_tiny_inputs(target, seed=3, text_len_before=9, text_len_after=1),
    ]


def case(mode: str, target, image_first: bool = False) -> tuple[dict, list[dict]]:
    """The inputs of a mode (one prompt, or a ragged batch of three) and its rows, each alone;
    `image_first`: the (first) prompt's very first token is an image placeholder."""
    if mode in BATCH_MODES:
        rows = ragged_rows(target, image_first)
    else:
        rows = [make_tiny_inputs(target, seed=1, **starting_with_the_image(image_first))]
    return (stack_tiny_inputs(target, rows) if len(rows) > 1 else rows[0]), rows


def run(mode: str, target, inputs: dict, drafter, **kwargs):
    if mode in TREE_MODES:
        return target.generate(**inputs, custom_generate=tree_generate, drafter=drafter, **{**TREE, **kwargs})
    return target.generate(**inputs, assistant_model=drafter, **kwargs)


def new_tokens_alone(target, rows, **kwargs) -> list[torch.Tensor]:
    """Each prompt decoded alone with plain generate: its new tokens."""
    return [target.generate(**row, **kwargs)[0, row["input_ids"].shape[1] :] for row in rows]


def row_sequences(rows: list[dict], output: torch.Tensor, width: int) -> dict[int, torch.Tensor]:
    """Row r's unpadded prompt plus its new tokens in `output` (after `width` prompt columns): what a row oracle predicts."""
    return {r: torch.cat([row["input_ids"][0], output[r, width:]]) for r, row in enumerate(rows)}


def position_kind(row: int, position: int) -> str:
    """Deterministic pseudo-random role of a (row, position) for the oracle: the target's token is
    the drafter's first choice ("top"), its second behind a wrong token ("side"), or nowhere in its
    top-k ("miss"). A chain (top-1) stops at side positions, a tree goes through them."""
    draw = random.Random(row * 104729 + position * 7919 + 17).random()
    return "miss" if draw < 0.2 else "side" if draw < 0.5 else "top"


class ModeOracleDraftModel(DreamDraftModel):
    """A drafter that knows each row's continuation, for every mode.

    It runs the real DREAM network (caches, feature memory, compression are exercised) and then
    overrides the logits by (row, position): the right token first, second behind a wrong one, or
    far below the top-k. Rows are `self.row` plus the input batch rows the custom loops expose as
    `drafter.batch_rows` (in transformers' chain loop, none: row `self.row`), so a prompt decoded
    alone with `row=r` is drafted for exactly as row r of a batch.
    """

    oracles: dict[int, torch.Tensor] | None = None
    row: int = 0

    def forward(self, inputs_embeds, position_ids, *args, **kwargs):
        output = super().forward(inputs_embeds, position_ids, *args, **kwargs)
        logits = torch.full_like(output.logits, -10.0)
        vocab = logits.shape[-1]
        rows = [self.row + r for r in self.batch_rows] if self.batch_rows is not None else [self.row] * position_ids.shape[0]
        for index, positions in enumerate(position_ids.tolist()):
            sequence = self.oracles[rows[index]]
            for column, position in enumerate(positions):
                following = position + 1
                right = int(sequence[following]) % vocab if following < len(sequence) else 0
                kind = position_kind(rows[index], following)
                logits[index, column, right if kind == "top" else (right + 1) % vocab] = 10.0
                if kind == "side":
                    logits[index, column, right] = 8.0
                elif kind == "miss":
                    logits[index, column, right] = -30.0
        output.logits = logits
        return output


def mode_oracle(target, sequences: dict[int, torch.Tensor], row: int = 0, **overrides) -> ModeOracleDraftModel:
    drafter = build_drafter(ModeOracleDraftModel, target, **overrides)
    drafter.attach_target(target)
    drafter.oracles, drafter.row = sequences, row
    return drafter


def check_row_stats(stats: dict, new_tokens: list[int]) -> None:
    """Per-row statistics read like batch-1 statistics; batch totals are their sums."""
    for row_stats, count in zip(stats["rows"], new_tokens):
        assert row_stats["new_tokens"] == count
        assert row_stats["target_passes"] == len(row_stats["accepted_per_pass"]) == len(row_stats["drafted_per_pass"]) + 1
        assert sum(a + 1 for a in row_stats["accepted_per_pass"]) == count
        assert row_stats["accepted_tokens"] == sum(row_stats["accepted_per_pass"])
        assert row_stats["drafted_tokens"] == sum(row_stats["drafted_per_pass"])
        assert row_stats["acceptance_length"] == pytest.approx(count / row_stats["target_passes"])
    rows = stats["rows"]
    for key in ("new_tokens", "accepted_tokens", "drafted_tokens"):
        assert stats[key] == sum(r[key] for r in rows)
    assert stats["row_passes"] == sum(r["target_passes"] for r in rows) == sum(stats["active_rows_per_pass"])
    assert stats["target_passes"] == max(r["target_passes"] for r in rows) == len(stats["active_rows_per_pass"])
    assert stats["acceptance_length"] == pytest.approx(stats["new_tokens"] / stats["row_passes"])
    assert stats["tokens_per_pass"] == pytest.approx(stats["new_tokens"] / stats["target_passes"])
    assert sum(stats["accepted_per_pass"]) == stats["accepted_tokens"]


def check_mode_stats(mode: str, stats: dict, inputs: dict, output: torch.Tensor, target, rows, **kwargs) -> None:
    """`last_stats` agrees with itself and with the output, in the mode's layout (rows of a batch:
    with the numbers of new tokens of each prompt decoded alone with plain generate and `kwargs`)."""
    if mode in BATCH_MODES:
        check_row_stats(stats, [len(t) for t in new_tokens_alone(target, rows, **kwargs)])
    else:
        check_stats(stats, inputs["input_ids"].shape[1], output)


def assert_rows_match(output, width: int, expected: list[torch.Tensor], pad_token_id: int) -> None:
    """Row r of a batched output = its padded prompt, then exactly `expected[r]`, then padding."""
    steps = output.shape[1] - width
    assert steps == max(len(tokens) for tokens in expected)
    for row, tokens in enumerate(expected):
        padding = torch.full((steps - len(tokens),), pad_token_id, dtype=torch.long)
        assert torch.equal(output[row, width:], torch.cat([tokens, padding])), f"row {row} differs"


def row_passes(stats: dict) -> list[dict]:
    return stats["rows"] if "rows" in stats else [stats]


# --- greedy ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("image_first", [False, True], ids=["text_first", "image_first"])
def test_greedy_output_is_plain_greedy_output(mode, family, image_first):
    """Partial, full and no acceptance; side branches in trees; identical output; also with the
    image as the very first prompt token."""
    target = cached_target(family)
    inputs, rows = case(mode, target, image_first)
    spec = target.tiny_spec
    if image_first:  # no bos, no text, no opening delimiter: an image placeholder opens the prompt
        assert all(int(row["input_ids"][0, 0]) == spec.image_token_id for row in rows[:2])
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    reference = target.generate(**inputs, **greedy)
    if mode in BATCH_MODES:  # plain batching is exact here: each row as its prompt alone
        assert_rows_match(reference, inputs["input_ids"].shape[1], new_tokens_alone(target, rows, **greedy), target.tiny_spec.pad_token_id)
    drafter = mode_oracle(target, row_sequences(rows, reference, inputs["input_ids"].shape[1]), num_draft_tokens=3)
    output = run(mode, target, inputs, drafter, **greedy)
    assert torch.equal(output, reference)
    stats = drafter.last_stats
    check_mode_stats(mode, stats, inputs, output, target, rows, **greedy)
    assert drafter.batch_rows is None  # the loops leave no decoding state on the module
    assert stats.get("batch_size", 1) == len(rows)
    assert stats["acceptance_length"] > 1.2
    kinds = set()
    for row_stats in row_passes(stats):
        accepted = row_stats["accepted_per_pass"][1:]
        if mode in TREE_MODES:  # through non-first children, and some rounds stopped inside the tree
            assert row_stats["side_branch_tokens"] > 0 and max(row_stats["drafted_per_pass"]) <= TREE["tree_total_tokens"]
            assert any(0 < a < TREE["tree_depth"] for a in accepted)
        kinds |= {"none" if a == 0 else "full" if a == d else "partial" for d, a in zip(row_stats["drafted_per_pass"], accepted)}
    if mode in TREE_MODES:
        assert {"none", "partial"} <= kinds
    else:
        assert kinds == {"none", "partial", "full"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fusion", ["cross_attention", "cross_attention_rope", "concat", "cross_attention_concat", "eagle3"])
def test_untrained_drafter_greedy_output_is_plain_greedy_output(mode, family, fusion):
    """A real (random) drafter: mostly rejected drafts, its own features in trees, still exact. "eagle3": the
    EAGLE-3-style drafter (concat fusion over several target layers, which decoding must read from the target);
    the cross-attention gates are opened so that the features (and their slots, with rope) matter."""
    target = cached_target(family)
    inputs, rows = case(mode, target)
    greedy = dict(max_new_tokens=20, do_sample=False)
    torch.manual_seed(0)
    options = {
        "eagle3": {"fusion": "concat", "feature_layers": "eagle3"},
        "cross_attention_rope": {"fusion": "cross_attention", "cross_attention_rope": True},
    }.get(fusion, {"fusion": fusion})
    drafter = DreamDraftModel.from_target(target, **options)
    if drafter.cross_block is not None:
        with torch.no_grad():
            drafter.cross_block.attn_gate.fill_(0.7)
            drafter.cross_block.mlp_gate.fill_(0.5)
    output = run(mode, target, inputs, drafter, **greedy)
    assert torch.equal(output, target.generate(**inputs, **greedy))
    check_mode_stats(mode, drafter.last_stats, inputs, output, target, rows, **greedy)


@pytest.mark.parametrize("mode", MODES)
def test_a_blank_drafter_image_changes_the_drafters_view_only(mode, family, monkeypatch):
    """`drafter_image="blank"` (the "does the drafter use the image" measurement): the drafter's prompt embeddings
    differ at the image positions and nowhere else, and the output is still plain greedy output."""
    from hf_dream.generation.drafter_state import DrafterState

    target = cached_target(family)
    inputs, rows = case(mode, target)
    greedy = dict(max_new_tokens=12, do_sample=False)
    seen = []
    prefill = DrafterState.prefill
    monkeypatch.setattr(DrafterState, "prefill", lambda self, ids, mask, embeds, *rest: seen.append((ids, embeds)) or prefill(self, ids, mask, embeds, *rest))
    torch.manual_seed(0)
    drafter = DreamDraftModel.from_target(target)
    outputs = [run(mode, target, inputs, drafter, drafter_image=view, **greedy) for view in ("real", "blank")]
    reference = target.generate(**inputs, **greedy)
    assert all(torch.equal(output, reference) for output in outputs)
    (ids, real), (_, blank) = seen
    images = drafter.target_adapter.image_token_mask(ids)
    assert images.any() and torch.equal(real[~images], blank[~images])
    assert not torch.allclose(real[images], blank[images])


@pytest.mark.parametrize("mode", MODES)
def test_reduced_draft_vocabulary_greedy_output_is_plain_greedy_output(mode, family):
    target = cached_target(family)
    inputs, rows = case(mode, target)
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    reference = target.generate(**inputs, **greedy)
    torch.manual_seed(0)
    drafter = DreamDraftModel.from_target(target, draft_vocab_size=32)
    # a draft vocabulary holding half of the tokens the target will produce
    produced = reference[:, inputs["input_ids"].shape[1] :].unique()
    vocab = torch.cat([produced[::2], torch.tensor([t for t in range(200) if t not in produced.tolist()])])[:32]
    drafter.set_draft_vocab(vocab.sort().values)
    output = run(mode, target, inputs, drafter, **greedy)
    assert torch.equal(output, reference)
    check_mode_stats(mode, drafter.last_stats, inputs, output, target, rows, **greedy)


@pytest.mark.parametrize("mode", MODES)
def test_eos_inside_a_draft(mode, family):
    """An EOS id the target produces late (batch: one that some rows produce early and others
    never): rows stop there, padded with pad_token_id as in plain generate."""
    target = cached_target(family)
    inputs, rows = case(mode, target)
    long_run = new_tokens_alone(target, rows, max_new_tokens=NEW_TOKENS, do_sample=False)
    first = [{} for _ in rows]
    for r, tokens in enumerate(long_run):
        for index, token in enumerate(tokens.tolist()):
            first[r].setdefault(token, index)
    if len(rows) == 1:  # as late as possible, at a position the oracle can accept
        width = inputs["input_ids"].shape[1]
        eos_index, eos = max((i, t) for t, i in first[0].items() if i > 0 and position_kind(0, width + i) == "top")
    else:  # the token some row reaches earliest (after its first token) while another row never emits it
        candidates = [(min(f[t] for f in first if t in f), t) for t in set().union(*first) if any(t not in f for f in first) and all(f.get(t, 1) >= 1 for f in first)]
        _, eos = min(candidates)
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos)
    plain = target.generate(**inputs, **greedy)
    lengths = [len(t) for t in new_tokens_alone(target, rows, **greedy)]
    if len(rows) == 1:
        assert lengths == [eos_index + 1] and int(plain[0, -1]) == eos
    else:  # some rows stop early, some do not
        assert min(lengths) < NEW_TOKENS == max(lengths)
        assert_rows_match(plain, inputs["input_ids"].shape[1], new_tokens_alone(target, rows, **greedy), target.tiny_spec.pad_token_id)
    drafter = mode_oracle(target, {r: torch.cat([row["input_ids"][0], long_run[r]]) for r, row in enumerate(rows)})
    output = run(mode, target, inputs, drafter, **greedy)
    assert torch.equal(output, plain)
    stats = drafter.last_stats
    check_mode_stats(mode, stats, inputs, output, target, rows, **greedy)
    if len(rows) > 1:
        assert stats["active_rows_per_pass"][-1] < len(rows)  # finished rows left the batch


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("max_new_tokens", [1, 2, 7, 13])
def test_max_new_tokens_inside_a_draft(mode, max_new_tokens):
    target = cached_target("llava")
    inputs, rows = case(mode, target)
    greedy = dict(max_new_tokens=max_new_tokens, do_sample=False)
    reference = target.generate(**inputs, **greedy)
    # the oracle drafts past the end; drafts are cut to the remaining budget
    long_run = new_tokens_alone(target, rows, max_new_tokens=max_new_tokens + 10, do_sample=False)
    drafter = mode_oracle(target, {r: torch.cat([row["input_ids"][0], long_run[r]]) for r, row in enumerate(rows)}, num_draft_tokens=5)
    output = run(mode, target, inputs, drafter, **greedy)
    assert torch.equal(output, reference) and output.shape[1] == inputs["input_ids"].shape[1] + max_new_tokens
    stats = drafter.last_stats
    check_mode_stats(mode, stats, inputs, output, target, rows, **greedy)
    for row_stats in row_passes(stats):
        if mode not in TREE_MODES:
            assert max(row_stats["drafted_per_pass"] or [0]) <= max(max_new_tokens - 1, 0)


@pytest.mark.parametrize("mode", MODES)
def test_repeated_calls_reset_state(mode, family):
    target = cached_target(family)
    inputs, rows = case(mode, target)
    reference = target.generate(**inputs, max_new_tokens=20, do_sample=False)
    drafter = mode_oracle(target, row_sequences(rows, reference, inputs["input_ids"].shape[1]))
    first = run(mode, target, inputs, drafter, max_new_tokens=20, do_sample=False)
    stats = dict(drafter.last_stats)
    second = run(mode, target, inputs, drafter, max_new_tokens=20, do_sample=False)
    assert torch.equal(first, second) and torch.equal(first, reference)
    assert drafter.last_stats["target_passes"] == stats["target_passes"]


@pytest.mark.parametrize("mode", BATCH_MODES)
def test_a_batch_row_decodes_as_its_prompt_alone(mode, family):
    """Each row of a batch drafts and accepts exactly what its prompt alone does in the
    batch-1 mode (chain for batches, tree for batched trees), visual-token compression included."""
    target = cached_target(family)
    inputs, rows = case(mode, target)
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    sequences = row_sequences(rows, target.generate(**inputs, **greedy), inputs["input_ids"].shape[1])
    drafter = mode_oracle(target, sequences)
    run(mode, target, inputs, drafter, **greedy)
    stats = drafter.last_stats
    alone_mode = "tree" if mode in TREE_MODES else "chain"
    for r, row in enumerate(rows):
        single = mode_oracle(target, sequences, row=r)
        run(alone_mode, target, row, single, **greedy)
        for key in ("drafted_per_pass", "accepted_per_pass", "visual_tokens", "visual_tokens_kept"):
            assert stats["rows"][r][key] == single.last_stats[key], (r, key)
        assert stats["rows"][r]["visual_tokens_kept"] < stats["rows"][r]["visual_tokens"]


def test_a_tree_accepts_more_than_a_chain_with_the_same_drafter(target, inputs):
    reference = target.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    drafter = mode_oracle(target, {0: reference[0]})
    assert torch.equal(run("tree", target, inputs, drafter, max_new_tokens=NEW_TOKENS, do_sample=False), reference)
    tree_tau = drafter.last_stats["acceptance_length"]
    assert torch.equal(run("chain", target, inputs, drafter, max_new_tokens=NEW_TOKENS, do_sample=False), reference)
    assert tree_tau > drafter.last_stats["acceptance_length"]


@pytest.mark.parametrize("mode", CUSTOM_MODES)
def test_gemma3_sliding_window_smaller_than_the_sequence(mode):
    """Sliding layers that overflow their window: tree masks follow the window, rows are re-packed
    after every round that left holes, and sliding layers are trimmed back to their window."""
    target = copy.deepcopy(cached_target("gemma3"))
    target.config.text_config.sliding_window = 8
    for layer in target.model.language_model.layers:
        if layer.self_attn.is_sliding:
            layer.self_attn.sliding_window = 8
    inputs, rows = case(mode, target)
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    reference = target.generate(**inputs, **greedy)
    if mode in BATCH_MODES:
        assert_rows_match(reference, inputs["input_ids"].shape[1], new_tokens_alone(target, rows, **greedy), target.tiny_spec.pad_token_id)
    drafter = mode_oracle(target, row_sequences(rows, reference, inputs["input_ids"].shape[1]))
    assert torch.equal(run(mode, target, inputs, drafter, **greedy), reference)
    assert drafter.last_stats["acceptance_length"] > 1.5
    if mode in BATCH_MODES:
        assert drafter.last_stats["target_cache_compactions"] > 0


@pytest.mark.parametrize("mode", TREE_MODES)
@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_eager_attention_takes_the_additive_tree_mask(mode, family):
    target = build_tiny_target(family, attn_implementation="eager")
    inputs, rows = case(mode, target)
    reference = target.generate(**inputs, max_new_tokens=20, do_sample=False)
    drafter = mode_oracle(target, row_sequences(rows, reference, inputs["input_ids"].shape[1]))
    assert torch.equal(run(mode, target, inputs, drafter, max_new_tokens=20, do_sample=False), reference)
    assert all(r["side_branch_tokens"] > 0 for r in row_passes(drafter.last_stats))


@pytest.mark.parametrize("mode", CUSTOM_MODES)
def test_prefix_dependent_processors(mode):
    """Processors that read each row's prefix (repetition penalty, min_new_tokens,
    no_repeat_ngram) see exactly what plain generate shows them, with the heuristic schedule."""
    target = cached_target("llava")
    inputs, rows = case(mode, target)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=1.3, min_new_tokens=12, no_repeat_ngram_size=2)
    plain = target.generate(**inputs, **kwargs)
    assert torch.equal(new_tokens_alone(target, rows[:1], **kwargs)[0], plain[0, inputs["input_ids"].shape[1] :])
    drafter = mode_oracle(target, row_sequences(rows, plain, inputs["input_ids"].shape[1]), draft_schedule="heuristic", num_draft_tokens=2)
    assert torch.equal(run(mode, target, inputs, drafter, **kwargs), plain)
    if mode not in TREE_MODES:
        assert len({d for r in row_passes(drafter.last_stats) for d in r["drafted_per_pass"]}) > 1


class StopAfter:
    """A user stopping criterion: stop after a given token (on each row's own sequence)."""

    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


STOP_POSITIONS = range(1, 13)  # stop at each of these new tokens of one row, one call each


def stop_case(mode: str, target):
    """Inputs, rows, each row's long greedy run, the row that stops, and an oracle drafting 5 tokens a round."""
    inputs, rows = case(mode, target)
    long_run = new_tokens_alone(target, rows, max_new_tokens=NEW_TOKENS, do_sample=False)
    drafter = mode_oracle(target, {r: torch.cat([row["input_ids"][0], long_run[r]]) for r, row in enumerate(rows)}, num_draft_tokens=5)
    return inputs, rows, long_run, (1 if len(rows) > 1 else 0), drafter


def check_stops_like_plain(mode, target, inputs, rows, stop_row, drafter, calls) -> None:
    """For every `(position, kwargs)`: the output is plain generate's exactly, the stopping row
    ends after new token `position` (inside an accepted block for some of them: 5-token
    drafts), and another row of a batch goes on."""
    inside = 0
    for position, kwargs in calls:
        kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)
        plain = target.generate(**inputs, **kwargs)
        output = run(mode, target, inputs, drafter, **kwargs)
        assert torch.equal(output, plain), f"stop after new token {position}"
        stats = row_passes(drafter.last_stats)[stop_row]
        assert stats["new_tokens"] == position + 1
        inside += stats["accepted_per_pass"][-1] > 0  # the row stopped in a block of several tokens
        if len(rows) > 1:
            assert output.shape[1] - inputs["input_ids"].shape[1] > position + 1  # another row went on
    assert inside >= 3


@pytest.mark.parametrize("mode", MODES)
def test_stopping_criteria_inside_an_accepted_block(mode):
    """A user stopping criterion that fires inside an accepted draft block cuts the output
    exactly where plain generate stops, in every mode (the chain through transformers' loop,
    which crops only at EOS and max_length), rows one by one in a batch."""
    from transformers import StoppingCriteriaList

    target = cached_target("llava_next")  # varied tiny outputs in every row
    inputs, rows, long_run, stop_row, drafter = stop_case(mode, target)
    calls = []
    for position in STOP_POSITIONS:
        token = int(long_run[stop_row][position])
        goes_on = [len(t) > position + 1 and token not in t[: position + 1].tolist() for r, t in enumerate(long_run) if r != stop_row]
        if token in long_run[stop_row][:position].tolist() or (goes_on and not any(goes_on)):
            continue  # the row would stop earlier, or no other row of a batch would go on
        calls.append((position, dict(stopping_criteria=StoppingCriteriaList([StopAfter(token)]))))
    assert len(calls) >= 6
    check_stops_like_plain(mode, target, inputs, rows, stop_row, drafter, calls)


@pytest.mark.parametrize("mode", MODES)
def test_stop_strings_inside_an_accepted_block(mode):
    """`stop_strings` with `tokenizer=` (which transformers drops on `custom_generate` paths) stop
    every mode where plain generate stops, also for strings spanning two tokens."""
    target = cached_target("llava_next")  # varied tiny outputs in every row
    tokenizer = build_tiny_tokenizer(target)
    inputs, rows, long_run, stop_row, drafter = stop_case(mode, target)
    text = tokenizer.decode(long_run[stop_row])  # one character per token
    assert len(text) == len(long_run[stop_row])
    calls = []
    for position in STOP_POSITIONS:
        stop = text[position - 1 : position + 1]  # the two characters ending at new token `position`
        goes_on = [len(t) > position + 1 and stop not in tokenizer.decode(t[: position + 1]) for r, t in enumerate(long_run) if r != stop_row]
        if stop in text[:position] or (goes_on and not any(goes_on)):
            continue  # the row would stop earlier, or no other row of a batch would go on
        calls.append((position, dict(stop_strings=[stop], tokenizer=tokenizer)))
    assert len(calls) >= 6
    check_stops_like_plain(mode, target, inputs, rows, stop_row, drafter, calls)


@pytest.mark.parametrize("mode", CUSTOM_MODES)
@pytest.mark.parametrize("family", ["llava", "pixtral"])
def test_scores_and_streamer_follow_plain_generate(mode, family):
    target = cached_target(family)
    inputs, rows = case(mode, target)
    kwargs = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_scores=True)
    plain_tokens = new_tokens_alone(target, rows, max_new_tokens=12, do_sample=False)
    eos = int(plain_tokens[0][3]) if len(rows) > 1 else None  # a batch: row 0 stops after 4 tokens
    plain = target.generate(**inputs, **kwargs, eos_token_id=eos)

    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value)

        def end(self):
            self.ended = True

    streamer = Recorder()
    drafter = mode_oracle(target, {r: torch.cat([row["input_ids"][0], plain_tokens[r]]) for r, row in enumerate(rows)})
    output = run(mode, target, inputs, drafter, **kwargs, eos_token_id=eos, streamer=streamer)
    width = inputs["input_ids"].shape[1]
    assert torch.equal(output.sequences, plain.sequences)
    lengths = (output.sequences[:, width:] != target.tiny_spec.pad_token_id).sum(1) if len(rows) > 1 else torch.tensor([12])
    assert len(output.scores) == len(plain.scores) == 12
    for step, (mine, theirs) in enumerate(zip(output.scores, plain.scores)):
        live = step < lengths  # plain generate keeps scoring finished rows; those are not compared
        torch.testing.assert_close(mine[live], theirs[live], atol=1e-4, rtol=1e-4)
    assert streamer.ended and torch.equal(streamer.chunks[0], inputs["input_ids"])
    assert torch.equal(torch.stack([c.reshape(-1) for c in streamer.chunks[1:]], dim=1), plain.sequences[:, width:])


# --- every generate() option: honoured, or refused before any work -------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_return_dict_without_scores(mode):
    """`return_dict_in_generate=True` alone: plain generate's sequences, no scores or logits."""
    target = cached_target("llava")
    inputs, rows = case(mode, target)
    kwargs = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    plain = target.generate(**inputs, **kwargs)
    torch.manual_seed(0)
    output = run(mode, target, inputs, DreamDraftModel.from_target(target), **kwargs)
    assert torch.equal(output.sequences, plain.sequences)
    assert output.scores is None and output.logits is None


@pytest.mark.parametrize("mode", MODES)
def test_output_hidden_states_is_returned_or_refused(mode):
    """The chain returns the target's hidden states as plain generate lays them out (one tuple of
    layers per step, the prompt in the first); the custom loops refuse the option up front."""
    target = cached_target("llava")
    inputs, rows = case(mode, target)
    kwargs = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_hidden_states=True)
    reference = target.generate(**inputs, max_new_tokens=20, do_sample=False)
    drafter = mode_oracle(target, row_sequences(rows, reference, inputs["input_ids"].shape[1]))
    if mode != "chain":
        with pytest.raises(ValueError, match="output_hidden_states=True` is not supported by .* Drop `output_hidden_states`"):
            run(mode, target, inputs, drafter, **kwargs)
        return
    plain = target.generate(**inputs, **kwargs)
    output = run(mode, target, inputs, drafter, **kwargs)
    assert torch.equal(output.sequences, plain.sequences) and drafter.last_stats["accepted_tokens"] > 0
    assert len(output.hidden_states) == len(plain.hidden_states) == 8
    for mine, theirs in zip(output.hidden_states, plain.hidden_states):
        assert len(mine) == len(theirs) == target.config.text_config.num_hidden_layers + 1
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)



def test_output_attentions_on_the_chain_needs_eager_attention_and_then_matches_plain():
    """SDPA returns no attention weights (transformers' assisted decoding then failed indexing them): refused up
    front naming the fix; with eager attention the chain returns one entry per new token, as plain generate."""
    sdpa = cached_target("llava")
    inputs = make_tiny_inputs(sdpa, seed=1)
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_attentions=True)
    with pytest.raises(ValueError, match="output_attentions=True` needs the target loaded with attn_implementation='eager'"):
        sdpa.generate(**inputs, assistant_model=DreamDraftModel.from_target(sdpa), **kwargs)
    eager = build_tiny_target("llava", attn_implementation="eager")
    plain = eager.generate(**inputs, **kwargs)
    output = eager.generate(**inputs, assistant_model=DreamDraftModel.from_target(eager), **kwargs)
    assert torch.equal(output.sequences, plain.sequences)
    assert len(output.attentions) == len(plain.attentions) == 6

def hooks_on(model) -> int:
    """Forward (pre-)hooks registered on any module of `model` (transformers registers some itself)."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_cache_continuation_and_embeds_only_are_refused(mode):
    """Continuing from an earlier turn's cache (`past_key_values`) and prompts given only as
    `inputs_embeds` are refused with an error that names the fix, before any target work."""
    target = cached_target("llava")
    inputs, rows = case(mode, target)
    first = target.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    more = torch.cat([first.sequences, torch.full((len(rows), 3), 5)], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(len(rows), more.shape[1] - inputs["attention_mask"].shape[1], dtype=torch.long)], dim=1)
    drafter = DreamDraftModel.from_target(target)
    calls, hooks = [], hooks_on(target)
    original = target.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    target.forward = counting_forward
    try:
        with pytest.raises(ValueError, match="starts from an empty cache.*Pass the whole conversation as `input_ids`"):
            run(mode, target, dict(input_ids=more, attention_mask=mask), drafter, max_new_tokens=6, do_sample=False,
                past_key_values=copy.deepcopy(first.past_key_values))
        embeds = target.get_input_embeddings()(inputs["input_ids"])
        with pytest.raises(ValueError, match="needs the prompt as `input_ids`.*instead of `inputs_embeds`"):
            run(mode, target, dict(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]), drafter, max_new_tokens=6)
    finally:
        del target.forward
    assert not calls and hooks_on(target) == hooks


# --- no state left behind, no state shared between calls ---------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_a_failed_prefill_leaves_nothing_on_the_target(mode):
    """A prefill that raises (two images for one image block) leaves no hook on the target and no
    row read-out on the drafter; the next call decodes as plain generate."""
    target = cached_target("llava")
    inputs, rows = case(mode, target)
    bad = dict(inputs, pixel_values=torch.cat([inputs["pixel_values"]] * 2))
    reference = target.generate(**inputs, max_new_tokens=12, do_sample=False)
    drafter = mode_oracle(target, row_sequences(rows, reference, inputs["input_ids"].shape[1]))
    assert drafter.config.visual_keep_ratio < 1.0  # the prefill is recorded for visual-token compression
    hooks = hooks_on(target)
    for _ in range(2):
        with pytest.raises(ValueError):
            run(mode, target, bad, drafter, max_new_tokens=12, do_sample=False)
        assert hooks_on(target) == hooks and drafter.batch_rows is None
    assert torch.equal(run(mode, target, inputs, drafter, max_new_tokens=12, do_sample=False), reference)
    assert hooks_on(target) == hooks


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_calls_on_one_target_record_their_own_prefill(mode, monkeypatch):
    """Two threads decode with the same target and their own drafters: the second thread's whole
    call runs between the first one's target prefill and its read-out of what that prefill
    recorded (deterministically interleaved); each compresses its own prompt's visual tokens
    and outputs plain generate's tokens."""
    import threading

    from hf_dream.generation.drafter_state import DrafterState

    target = cached_target("llava")
    hooks = hooks_on(target)
    inputs, rows = case(mode, target)
    other = make_tiny_inputs(target, seed=5, text_len_before=1, text_len_after=2)  # a shorter prompt
    greedy = dict(max_new_tokens=16, do_sample=False)
    reference, other_reference = target.generate(**inputs, **greedy), target.generate(**other, **greedy)
    sequences = row_sequences(rows, reference, inputs["input_ids"].shape[1])
    alone = mode_oracle(target, sequences)
    assert torch.equal(run(mode, target, inputs, alone, **greedy), reference)

    first, second = mode_oracle(target, sequences), mode_oracle(target, {0: other_reference[0]})
    results, errors = {}, []
    original = DrafterState.prefill

    def interleaved(self, *args):
        if self.drafter is first and "second" not in results:  # first thread: after the target's prefill, before its read-out
            def work():
                try:
                    results["second"] = run("tree" if mode in TREE_MODES else "chain", target, other, second, **greedy)
                except Exception as error:  # noqa: BLE001  (reported below)
                    errors.append(error)
            thread = threading.Thread(target=work)
            thread.start()
            thread.join()
        return original(self, *args)

    monkeypatch.setattr(DrafterState, "prefill", interleaved)
    results["first"] = run(mode, target, inputs, first, **greedy)
    assert not errors, errors
    assert torch.equal(results["first"], reference) and torch.equal(results["second"], other_reference)
    for key in ("visual_tokens_kept", "accepted_per_pass"):
        assert first.last_stats[key] == alone.last_stats[key], key
    assert hooks_on(target) == hooks


# --- the shared acceptance -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", CUSTOM_MODES)
@pytest.mark.parametrize("do_sample", [False, True])
def test_every_custom_mode_accepts_through_the_shared_acceptance(mode, do_sample, monkeypatch):
    """Every verified round of every row goes through `engine.accept` (a mode with an acceptance
    of its own fails this), and what it accepts is what the row gains."""
    target = cached_target("llava")
    inputs, rows = case(mode, target)
    reference = target.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    drafter = mode_oracle(target, row_sequences(rows, reference, inputs["input_ids"].shape[1]))
    walks = []
    shared = engine.accept

    def spy(tree, node_scores, sample, eos_token_ids=None):
        walks.append(shared(tree, node_scores, sample, eos_token_ids))
        assert sample == do_sample
        return walks[-1]

    monkeypatch.setattr(engine, "accept", spy)
    torch.manual_seed(0)
    run(mode, target, inputs, drafter, max_new_tokens=NEW_TOKENS, do_sample=do_sample)
    per_row = row_passes(drafter.last_stats)
    assert len(walks) == sum(r["target_passes"] - 1 for r in per_row) > 0
    assert sum(min(len(w.path), NEW_TOKENS) for w in walks) >= sum(r["accepted_tokens"] for r in per_row)


def test_the_chain_acceptance_is_the_shared_acceptance(target, inputs, monkeypatch):
    """transformers' assisted loop accepts the chain's drafts itself; replayed on a width-1
    tree, the shared greedy acceptance accepts exactly as many drafts, round by round."""
    reference = target.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    drafter = mode_oracle(target, {0: reference[0]})
    rounds = []
    original = DreamCandidateGenerator.update_candidate_strategy

    def record(self, input_ids, scores, num_matches):
        if self.num_drafted:
            rounds.append((self.last_candidates, scores, int(num_matches)))
        return original(self, input_ids, scores, num_matches)

    original_get = DreamCandidateGenerator.get_candidates

    def get(self, input_ids, *args, **kwargs):
        candidates, logits = original_get(self, input_ids, *args, **kwargs)
        self.last_candidates = candidates[0, input_ids.shape[1] :]
        return candidates, logits

    monkeypatch.setattr(DreamCandidateGenerator, "update_candidate_strategy", record)
    monkeypatch.setattr(DreamCandidateGenerator, "get_candidates", get)
    assert torch.equal(target.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, assistant_model=drafter), reference)
    assert rounds and any(0 < n < len(d) for d, _, n in rounds)
    for drafts, scores, num_matches in rounds:
        tree = engine.DraftTree.chain(0, drafts)
        walk = engine.accept(tree, lambda node, scores=scores: scores[:, node], do_sample=False)
        assert len(walk.path) == num_matches


# --- sampling ------------------------------------------------------------------------------------
VOCAB = 32
SAMPLES = {"chain": 800, "tree": 600}
COPIES, CALLS = 16, 50  # batches: each prompt repeated in one batch, 16 samples per call
GENERATE_KWARGS = dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.95)
SAMPLING_TREE = dict(tree_top_k=3, tree_depth=3, tree_total_tokens=8)


# Per family, the factor on the final norm's weight (= on every logit) that keeps the target's sampling distributions
# peaked but not one-hot on these tiny random models (the largest probability of new tokens 2 and 3 stays between
# ~0.3 and ~0.85 with the image first); gemma4's lm_head is tied to its input embeddings, so only the norm can be scaled.
# qwen3_vl's tiny text model is initialised wider (std 0.15): x40 would leave one token.
SAMPLING_LOGIT_SCALE = {
    "llava": 20.0, "mistral3": 15.0, "llava_onevision": 20.0, "internvl": 20.0, "gemma4": 25.0, "qwen2_5_vl": 40.0, "qwen3_vl": 3.0,
}
# the chain's random drafter opens its cross-attention to disagree with the target; on qwen2_5_vl's peaked
# distributions an open gate then never proposes an acceptable token (no acceptance in 800 samples)
CHAIN_DRAFTER_GATE = {"qwen2_5_vl": 0.0}
# Known gap (to investigate): with the image first, the greedy-keyed tree oracle is accepted only ~34 times in
# 600 samples on the tiny gemma4 (with the image first after the 'merge14' layout change), so its tree case
# checks the distribution with any acceptance at all rather than 0.5 accepted drafts per sample.
TREE_ACCEPTANCE_FLOOR = {"gemma4": 0.0}


def build_sampling_target(family: str = "llava", logit_scale: float | None = None):
    """The tiny target of the sampling tests; `logit_scale`: scale the logits through the final norm instead of
    the default (the first suite's LLaVA with its lm_head x 40)."""
    target = build_tiny_target(family, seed=11, vocab_size=VOCAB)
    with torch.no_grad():  # peaked, image-dependent distributions make the test sharp
        if logit_scale is None:
            target.lm_head.weight.mul_(40.0)
        else:
            target.get_decoder().norm.weight.mul_(logit_scale)
    return target


@pytest.fixture(scope="module")
def sampling_target():
    return build_sampling_target()


STOPPED = VOCAB  # the outcome of a position after the output stopped (a stop string fired earlier)


@dataclass
class ExactPrefixDistributions:
    """The target's processed sampling distribution over the first three new tokens, exactly: `joint12`
    (t1, t2) and `third_given` ((t1, t2) flattened, t3)."""

    joint12: torch.Tensor
    third_given: torch.Tensor

    def marginals(self, stop_token: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Marginals of new tokens 2 and 3; with `stop_token` (output stops right after it), each with one more
        cell, `STOPPED`: the output ended before that position."""
        if stop_token is None:
            return self.joint12.sum(0), (self.joint12.flatten()[:, None] * self.third_given).sum(0)
        goes_on = self.joint12.clone()
        goes_on[stop_token] = 0  # t1 = stop: no second token
        second = goes_on.sum(0)
        goes_on[:, stop_token] = 0  # t2 = stop: no third token
        third = (goes_on.flatten()[:, None] * self.third_given).sum(0)
        return torch.cat([second, 1 - second.sum()[None]]), torch.cat([third, 1 - third.sum()[None]])

    def stop_probability_at_second(self, token: int) -> float:
        """P(t2 = token and t1 != token): the output stops right after new token 2."""
        return float(self.joint12[:, token].sum() - self.joint12[token, token])


def exact_distributions(target, inputs, kwargs) -> ExactPrefixDistributions:
    """Exact distributions of new tokens 1-3 under the target's processed sampling distribution, by enumerating
    every (t1, t2) prefix in one batched forward each."""
    from transformers import GenerationConfig

    config = GenerationConfig(**{k: v for k, v in kwargs.items() if k != "max_new_tokens"})
    processors = target._get_logits_processor(config, input_ids_seq_length=inputs["input_ids"].shape[1])

    def next_probs(prefixes):
        rows = [dict(inputs, input_ids=prefix[None], attention_mask=torch.ones_like(prefix[None])) for prefix in prefixes]
        with torch.no_grad():  # the prompt's images once per prefix, in the family's batch layout
            logits = target(**stack_tiny_inputs(target, rows)).logits[:, -1].float()
        return processors(prefixes, logits).softmax(-1)

    prompt = inputs["input_ids"]
    p1 = next_probs(prompt)[0]
    alive1 = (p1 > 0).nonzero().squeeze(-1)  # suppressed ids (the image token...) never occur
    p2_given_1 = torch.zeros(VOCAB, VOCAB)  # (t1, t2)
    p2_given_1[alive1] = next_probs(torch.cat([prompt.repeat(len(alive1), 1), alive1[:, None]], dim=1))
    joint12 = p1[:, None] * p2_given_1
    pairs = torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))
    alive = joint12.flatten() > 0
    p3_given_12 = torch.zeros(VOCAB * VOCAB, VOCAB)
    p3_given_12[alive] = next_probs(torch.cat([prompt.repeat(int(alive.sum()), 1), pairs[alive]], dim=1))
    return ExactPrefixDistributions(joint12, p3_given_12)


def goodness_of_fit(observed_tokens, expected_probs):
    from scipy.stats import chisquare

    counts = torch.bincount(observed_tokens, minlength=len(expected_probs)).double()
    expected = expected_probs.double() * counts.sum()
    big = expected >= 5  # pool rare cells so the chi-square approximation holds
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    if expected[-1] < 5:  # nothing left to pool
        observed, expected = observed[:-1], expected[:-1]
    expected = expected * observed.sum() / expected.sum()
    pvalue = chisquare(observed.numpy(), expected.numpy()).pvalue
    print(f"chi-square p={pvalue:.3g} over {len(observed)} cells")
    return pvalue


def sampling_case(mode, target, draft_vocab_size=None, image_first=False):
    """Prompts (one, or two of different lengths batched as copies; `image_first`: starting with
    the image), sampling kwargs, the exact distributions per prompt and the mode's drafter: a random
    drafter with its cross-attention open for chains (sampled drafts), an oracle proposing the
    mode first or second for trees."""
    first = starting_with_the_image(image_first)
    prompts = [make_tiny_inputs(target, seed=6, **first)]
    if mode in BATCH_MODES:
        pair = make_tiny_inputs(target, seed=6, batch_size=2, **first)
        prompts = [tiny_inputs_row(target, pair, r) for r in range(2)]
    # 4 new tokens: tokens 2 and 3 come from acceptances, sibling tries, residual draws and bonus tokens
    kwargs = dict(GENERATE_KWARGS, suppress_tokens=sorted(target.tiny_spec.special_token_ids), max_new_tokens=4 if mode != "chain" else 3)
    distributions = [exact_distributions(target, prompt, kwargs) for prompt in prompts]
    torch.manual_seed(0)
    if mode in TREE_MODES:
        greedy = {r: target.generate(**p, max_new_tokens=8, do_sample=False)[0] for r, p in enumerate(prompts)}
        drafter = mode_oracle(target, {r: greedy[r % len(prompts)] for r in range(len(prompts) * COPIES)})
    else:
        drafter = DreamDraftModel.from_target(target, num_draft_tokens=2, visual_keep_ratio=0.75, draft_vocab_size=draft_vocab_size)
        if draft_vocab_size:  # tokens outside the draft vocabulary have q = 0: still lossless
            drafter.set_draft_vocab(torch.arange(8, 8 + draft_vocab_size))
        with torch.no_grad():  # a drafter that really disagrees with the target
            drafter.cross_block.attn_gate.fill_(CHAIN_DRAFTER_GATE.get(target.tiny_spec.family, 1.0))
    return prompts, kwargs, distributions, drafter


def sample(mode, target, prompts, kwargs, drafter):
    """New tokens per prompt (SAMPLES or COPIES * CALLS each) and the summed statistics."""
    tokens, totals = [[] for _ in prompts], {"accepted_tokens": 0, "drafted_tokens": 0, "side_branch_tokens": 0}
    tree = SAMPLING_TREE if mode in TREE_MODES else {}
    if mode in BATCH_MODES:
        batch = stack_tiny_inputs(target, prompts * COPIES)
        calls, width = CALLS, batch["input_ids"].shape[1]
    else:
        batch, calls, width = prompts[0], SAMPLES[mode], prompts[0]["input_ids"].shape[1]
    for seed in range(calls):
        torch.manual_seed(seed)
        output = run(mode, target, batch, drafter, **kwargs, **tree)
        for row in range(output.shape[0]):  # an output that stopped early is padded with STOPPED
            new_tokens = output[row, width:]
            padded = torch.nn.functional.pad(new_tokens, (0, kwargs["max_new_tokens"] - len(new_tokens)), value=STOPPED)
            tokens[row % len(prompts)].append(padded)
        for key in totals:
            totals[key] += drafter.last_stats.get(key, 0)
    return [torch.stack(t) for t in tokens], totals


def check_sampling_distribution(mode, target, draft_vocab_size=None, image_first=False, min_tree_acceptance=1.0, side_branches=True):
    """Chi-square of new tokens 2 and 3 against the exact marginals, after checking that the case is sharp:
    distributions not one-hot, acceptances and rejections, and for trees at least `min_tree_acceptance` accepted
    drafts per sample and (`side_branches`) acceptances through non-first children."""
    prompts, kwargs, distributions, drafter = sampling_case(mode, target, draft_vocab_size, image_first)
    marginals = [d.marginals() for d in distributions]
    for p2, p3 in marginals:
        assert p2.max() < 0.9 and p3.max() < 0.9  # the drafts really get rejected sometimes
    tokens, totals = sample(mode, target, prompts, kwargs, drafter)
    assert 0 < totals["accepted_tokens"] < totals["drafted_tokens"]  # acceptances and rejections both happened
    if mode in TREE_MODES:  # deep and side-branch acceptances happened
        assert totals["accepted_tokens"] > min_tree_acceptance * len(tokens[0])
        assert totals["side_branch_tokens"] > len(tokens[0]) // 4 or not side_branches
    for row_tokens, (p2, p3) in zip(tokens, marginals):
        assert goodness_of_fit(row_tokens[:, 1], p2) > 1e-3
        assert goodness_of_fit(row_tokens[:, 2], p3) > 1e-3


@pytest.mark.parametrize("mode, draft_vocab_size", [("chain", None), ("chain", 12), ("tree", None), ("batch", None), ("batched_tree", None)])
def test_sampling_distribution_matches_plain_sampling(mode, draft_vocab_size, sampling_target):
    check_sampling_distribution(mode, sampling_target, draft_vocab_size)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["chain", "tree", "batch"])
@pytest.mark.parametrize("family", ["llava", "mistral3", "llava_onevision", "internvl", "gemma4", "qwen2_5_vl", "qwen3_vl"])
def test_sampling_distribution_with_the_image_first(mode, family):
    """Every family added after the first five (and LLaVA), each prompt starting with its image (for the M-RoPE
    families, 1-D and both 3-D layouts: every position after the image is offset). The targets are less
    peaked than the first suite's, so trees accept fewer drafts per sample, and the oracle's second children (keyed to
    the greedy continuation) are rarely accepted on some families: sampling through side branches is the first
    suite's case (LLaVA, text first); here the trees' deep acceptances, residual draws and bonus tokens are tested."""
    target = build_sampling_target(family, SAMPLING_LOGIT_SCALE[family])
    check_sampling_distribution(mode, target, image_first=True, min_tree_acceptance=TREE_ACCEPTANCE_FLOOR.get(family, 0.5), side_branches=False)


def stopped_outcomes(tokens: torch.Tensor, stop_token: int, pad_token_id: int) -> torch.Tensor:
    """Sampled new tokens with every position after a stop as `STOPPED` (a batch pads its finished rows), after
    checking that each sample ends right after its first stop token, as plain sampling does."""
    outcomes = tokens.masked_fill(tokens == pad_token_id, STOPPED)  # the pad id is suppressed: never sampled
    for row in outcomes.tolist():
        end = row.index(stop_token) + 1 if stop_token in row else len(row)
        assert STOPPED not in row[:end] and set(row[end:]) <= {STOPPED}, f"{row}: not cut right after {stop_token}"
    return outcomes


def favouring(drafter, token: int, bias: float = 4.0):
    """`drafter` with its logits of `token` raised, so that its sampled chains often draft it (sampling stays
    lossless under any draft distribution the drafts are really sampled from)."""
    forward = drafter.forward

    def biased(*args, **kwargs):
        output = forward(*args, **kwargs)
        output.logits[..., token] += bias
        return output

    drafter.forward = biased
    return drafter


@pytest.mark.parametrize("mode", MODES)
def test_sampling_with_a_stop_string_cuts_where_plain_sampling_stops(mode, sampling_target):
    """`stop_strings` with `tokenizer=` under sampling: every sample ends right after its first stop token (also
    where that token is an accepted draft and the rest of its block is cut), and new tokens 2 and 3, with
    'stopped' as one more outcome (so the output lengths too), follow plain sampling's exact distribution."""
    prompts, kwargs, distributions, drafter = sampling_case(mode, sampling_target)
    stop_token = max(range(VOCAB), key=distributions[0].stop_probability_at_second)  # the stop fires inside blocks
    assert distributions[0].stop_probability_at_second(stop_token) > 0.1
    if mode not in TREE_MODES:  # the random chain drafter: make it draft the stop token (the trees' oracle drafts the greedy one)
        drafter = favouring(drafter, stop_token)
    tokenizer = build_tiny_tokenizer(sampling_target)
    stop = dict(stop_strings=[tokenizer.decode([stop_token])], tokenizer=tokenizer)
    tokens, totals = sample(mode, sampling_target, prompts, {**kwargs, **stop}, drafter)
    assert 0 < totals["accepted_tokens"] < totals["drafted_tokens"]
    for row_tokens, distribution in zip(tokens, distributions):
        outcomes = stopped_outcomes(row_tokens, stop_token, sampling_target.tiny_spec.pad_token_id)
        second, third = distribution.marginals(stop_token)
        assert goodness_of_fit(outcomes[:, 1], second) > 1e-3
        assert goodness_of_fit(outcomes[:, 2], third) > 1e-3
    assert (tokens[0][:, 1] == stop_token).sum() > len(tokens[0]) // 20  # many samples stopped after token 2


class AlwaysAcceptGenerator(DreamCandidateGenerator):
    """A wrong chain: reports a near-zero draft probability for every drafted token, so that
    transformers' acceptance test keeps every draft (output = the drafter's distribution)."""

    def _draft(self, input_ids, output):
        candidates, logits = super()._draft(input_ids, output)
        if logits is None:
            return candidates, None
        drafted = candidates[:, input_ids.shape[1] :]
        return candidates, torch.zeros_like(logits).scatter(-1, drafted[..., None], -40.0)


@pytest.mark.parametrize("mode", MODES)
def test_a_wrong_acceptance_fails_the_same_test(mode, sampling_target, monkeypatch):
    """The custom modes forget the residual (after a rejection the next token is drawn from p
    instead of max(p - q, 0), which favours drafted tokens); the chain keeps every draft."""
    prompts, kwargs, distributions, drafter = sampling_case(mode, sampling_target)
    marginals = [d.marginals() for d in distributions]
    if mode == "chain":
        from hf_dream.generation import hook

        monkeypatch.setattr(hook, "DreamCandidateGenerator", AlwaysAcceptGenerator)
    else:
        monkeypatch.setattr(engine, "residual_distribution", lambda p, q: p)
    tokens, _ = sample(mode, sampling_target, prompts, kwargs, drafter)
    pvalues = [goodness_of_fit(t[:, i], m[i - 1]) for t, m in zip(tokens, marginals) for i in (1, 2)]
    assert min(pvalues) < 1e-3
