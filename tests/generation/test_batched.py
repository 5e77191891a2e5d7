"""Batched DREAM chain decoding (batch size > 1): every row's output is identical to decoding that
prompt alone with plain greedy decoding (and to plain batched greedy generate), for every family,
with ragged prompts, different numbers of images per row, rows finishing at different times, and
per-row acceptance; per-row sampling is lossless (chi-square against the exact distribution, and a
biased implementation fails the same test)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import cached_target

from hf_dream import DreamDraftModel
from hf_dream.generation import engine
from hf_dream.generation.batched import batched_generate
from hf_dream.generation.kv_cache import RaggedCache
from hf_dream.testing import build_tiny_target, make_tiny_inputs, stack_tiny_inputs, tiny_inputs_row

NEW_TOKENS = 30


# --- helpers -------------------------------------------------------------------------------------
def ragged_rows(target) -> list[dict]:
    """Three prompts of different text lengths; the second holds two images."""
    return [
        make_tiny_inputs(target, seed=1),
        make_tiny_inputs(target, seed=2, num_images=2, text_len_before=2),
        make_tiny_inputs(target, seed=3, text_len_before=9, text_len_after=1),
    ]


def row_corrupted(row: int, position: int) -> bool:
    """Deterministic pseudo-random ~25% of positions, per row, where the oracle proposes a wrong token."""
    return random.Random(row * 7919 + position * 31 + 5).random() < 0.25


class RowOracleDraftModel(DreamDraftModel):
    """A drafter that knows each row's greedy continuation (keyed by the input batch row, which
    batched decoding exposes as `drafter.batch_rows`) and corrupts some positions per row.

    It runs the real DREAM network (caches, feature memory, compression are exercised) and then
    overrides the logits: at a row's position p it predicts that row's token p + 1. A batch-1 run
    (no `batch_rows`) plays row `self.row`, so it drafts exactly what that row drafts in a batch.
    """

    oracles: dict[int, torch.Tensor] | None = None
    row: int = 0

    def forward(self, inputs_embeds, position_ids, *args, **kwargs):
        output = super().forward(inputs_embeds, position_ids, *args, **kwargs)
        logits = torch.full_like(output.logits, -10.0)
        vocab = logits.shape[-1]
        rows = self.batch_rows if self.batch_rows is not None else [self.row] * position_ids.shape[0]
        for index, positions in enumerate(position_ids.tolist()):
            row = rows[index]
            sequence = self.oracles[row]
            for column, position in enumerate(positions):
                following = position + 1
                token = int(sequence[following]) % vocab if following < len(sequence) else 0
                if row_corrupted(row, following):
                    token = (token + 1) % vocab
                logits[index, column, token] = 10.0
        output.logits = logits
        return output


def row_oracle(target, sequences: dict[int, torch.Tensor], row: int = 0, **overrides) -> RowOracleDraftModel:
    drafter = RowOracleDraftModel(DreamDraftModel.config_for_target(target, **overrides))
    drafter.attach_target(target)
    drafter.oracles, drafter.row = sequences, row
    return drafter


def new_tokens_alone(target, rows, **kwargs) -> list[torch.Tensor]:
    """Each prompt decoded alone with plain generate: its new tokens."""
    return [target.generate(**row, **kwargs)[0, row["input_ids"].shape[1] :] for row in rows]


def assert_rows_match(output, width: int, expected: list[torch.Tensor], pad_token_id: int) -> None:
    """Row r of a batched output = its padded prompt, then exactly `expected[r]`, then padding."""
    steps = output.shape[1] - width
    assert steps == max(len(tokens) for tokens in expected)
    for row, tokens in enumerate(expected):
        padding = torch.full((steps - len(tokens),), pad_token_id, dtype=torch.long)
        assert torch.equal(output[row, width:], torch.cat([tokens, padding])), f"row {row} differs"


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


# --- greedy --------------------------------------------------------------------------------------
def test_oracle_batched_greedy_equality(target):
    """Ragged prompts, 1 and 2 images per row: identical to each prompt alone and to plain batched
    greedy; each row's rounds are exactly the ones it gets when decoded alone."""
    rows = ragged_rows(target)
    batch = stack_tiny_inputs(target, rows)
    width = batch["input_ids"].shape[1]
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    alone = new_tokens_alone(target, rows, **greedy)
    plain = target.generate(**batch, **greedy)
    assert_rows_match(plain, width, alone, target.tiny_spec.pad_token_id)  # plain batching is exact here

    sequences = {r: torch.cat([rows[r]["input_ids"][0], alone[r]]) for r in range(len(rows))}
    drafter = row_oracle(target, sequences)
    output = target.generate(**batch, **greedy, assistant_model=drafter)
    assert torch.equal(output, plain)
    stats = drafter.last_stats
    assert stats["batch_size"] == 3 and drafter.batch_rows is None
    check_row_stats(stats, [len(tokens) for tokens in alone])

    kinds = set()
    for r, row in enumerate(rows):
        single = row_oracle(target, sequences, row=r)
        assert torch.equal(target.generate(**row, **greedy, assistant_model=single)[0, row["input_ids"].shape[1] :], alone[r])
        row_stats = stats["rows"][r]
        # the same drafts and acceptances as this prompt alone (chain decoding, batch 1)
        assert row_stats["drafted_per_pass"] == single.last_stats["drafted_per_pass"]
        assert row_stats["accepted_per_pass"] == single.last_stats["accepted_per_pass"]
        assert row_stats["visual_tokens_kept"] == single.last_stats["visual_tokens_kept"] < row_stats["visual_tokens"]
        kinds |= {"none" if a == 0 else "full" if a == d else "partial" for d, a in zip(row_stats["drafted_per_pass"], row_stats["accepted_per_pass"][1:])}
    assert kinds == {"none", "partial", "full"}
    assert stats["acceptance_length"] > 2.0


def test_rows_finishing_at_different_times(target):
    """An EOS id that some rows produce early: those rows stop and are padded with pad_token_id,
    as in plain generate, while the others go on."""
    rows = ragged_rows(target)
    batch = stack_tiny_inputs(target, rows)
    width = batch["input_ids"].shape[1]
    long_run = new_tokens_alone(target, rows, max_new_tokens=NEW_TOKENS, do_sample=False)
    first = [{} for _ in rows]
    for r, tokens in enumerate(long_run):
        for index, token in enumerate(tokens.tolist()):
            first[r].setdefault(token, index)
    # the token some row reaches earliest (after its first token) while another row never emits it
    candidates = [
        (min(f[t] for f in first if t in f), t)
        for t in set().union(*first)
        if any(t not in f for f in first) and all(f.get(t, 1) >= 1 for f in first)
    ]
    _, eos = min(candidates)
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos)
    alone = new_tokens_alone(target, rows, **greedy)
    lengths = [len(tokens) for tokens in alone]
    assert min(lengths) < NEW_TOKENS == max(lengths)  # some rows stop early, some do not

    plain = target.generate(**batch, **greedy)
    sequences = {r: torch.cat([rows[r]["input_ids"][0], long_run[r]]) for r in range(len(rows))}
    drafter = row_oracle(target, sequences)
    output = target.generate(**batch, **greedy, assistant_model=drafter)
    assert_rows_match(output, width, alone, target.tiny_spec.pad_token_id)
    assert torch.equal(output, plain)
    stats = drafter.last_stats
    check_row_stats(stats, lengths)
    assert stats["active_rows_per_pass"][-1] < len(rows)  # finished rows left the batch


def test_untrained_drafter_batched_equality(target):
    """A real (random) drafter: mostly rejected drafts, still every row's exact output."""
    check_untrained_drafter(target, "cross_attention")


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_untrained_concat_drafter_batched_equality(family):
    check_untrained_drafter(cached_target(family), "concat")


def check_untrained_drafter(target, fusion, **overrides):
    rows = ragged_rows(target)
    batch = stack_tiny_inputs(target, rows)
    greedy = dict(max_new_tokens=20, do_sample=False)
    alone = new_tokens_alone(target, rows, **greedy)
    torch.manual_seed(0)
    drafter = DreamDraftModel.from_target(target, fusion=fusion, **overrides)
    output = target.generate(**batch, **greedy, assistant_model=drafter)
    assert_rows_match(output, batch["input_ids"].shape[1], alone, target.tiny_spec.pad_token_id)
    check_row_stats(drafter.last_stats, [len(t) for t in alone])
    return drafter


def test_auto_draft_schedule_drafts_a_constant_length_in_batches():
    """`draft_schedule="auto"` sizes batch-1 chains; a batch drafts `num_draft_tokens` per row and stays exact."""
    drafter = check_untrained_drafter(cached_target("llava"), "cross_attention", draft_schedule="auto", num_draft_tokens=3)
    assert {d for row in drafter.last_stats["rows"] for d in row["drafted_per_pass"]} <= {0, 1, 2, 3}
    assert max(d for row in drafter.last_stats["rows"] for d in row["drafted_per_pass"]) == 3


class RecordingDraftModel(DreamDraftModel):
    """A real drafter that records its logits at every (input batch row, position) it runs,
    later runs overwriting earlier ones (position 0 is skipped: batched padding uses it)."""

    row: int = 0

    def forward(self, inputs_embeds, position_ids, *args, **kwargs):
        output = super().forward(inputs_embeds, position_ids, *args, **kwargs)
        rows = self.batch_rows if self.batch_rows is not None else [self.row] * position_ids.shape[0]
        for index, positions in enumerate(position_ids.tolist()):
            for column, position in enumerate(positions):
                if position > 0:
                    self.seen[(rows[index], position)] = output.logits[index, column].clone()
        return output


@pytest.mark.parametrize("family, fusion", [("llava", "cross_attention"), ("idefics3", "cross_attention"), ("gemma3", "concat")])
def test_batched_drafter_computes_what_it_computes_alone(family, fusion):
    """The drafter network itself (its cache, per-row feature memory, per-row visual-token
    compression) gives every row the logits it gives that prompt alone, at every position."""
    target = cached_target(family)
    rows = ragged_rows(target)
    torch.manual_seed(0)
    drafter = RecordingDraftModel(DreamDraftModel.config_for_target(target, fusion=fusion, num_draft_tokens=3))
    drafter.attach_target(target)
    if drafter.cross_block is not None:
        with torch.no_grad():  # an untrained block is the identity: open it so the memory matters
            drafter.cross_block.attn_gate.fill_(1.0)
    greedy = dict(max_new_tokens=16, do_sample=False)
    alone = {}
    for r, row in enumerate(rows):
        drafter.seen, drafter.row = {}, r
        target.generate(**row, **greedy, assistant_model=drafter)
        alone.update(drafter.seen)
    drafter.seen = {}
    target.generate(**stack_tiny_inputs(target, rows), **greedy, assistant_model=drafter)
    # (the batch may run a few more positions: rows that stopped drafting still take part in the
    # lockstep draft forwards, whose outputs are ignored)
    assert alone.keys() <= drafter.seen.keys()
    for key, logits in alone.items():
        torch.testing.assert_close(drafter.seen[key], logits, atol=2e-4, rtol=1e-4, msg=f"row, position {key}")


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7])
def test_max_new_tokens_inside_a_draft(max_new_tokens):
    target = cached_target("llava")
    rows = ragged_rows(target)
    batch = stack_tiny_inputs(target, rows)
    greedy = dict(max_new_tokens=max_new_tokens, do_sample=False)
    long_run = new_tokens_alone(target, rows, max_new_tokens=max_new_tokens + 10, do_sample=False)
    drafter = row_oracle(target, {r: torch.cat([rows[r]["input_ids"][0], long_run[r]]) for r in range(3)})
    output = target.generate(**batch, **greedy, assistant_model=drafter)
    assert torch.equal(output, target.generate(**batch, **greedy))
    assert output.shape[1] == batch["input_ids"].shape[1] + max_new_tokens
    stats = drafter.last_stats
    check_row_stats(stats, [max_new_tokens] * 3)
    assert max(stats["drafted_per_pass"] or [0]) <= 3 * max(max_new_tokens - 1, 0)


def test_gemma3_sliding_window_smaller_than_the_sequence():
    """Sliding layers count their window in cache columns: rows are re-packed after every round
    that left holes, and the output is still exact."""
    target = copy.deepcopy(cached_target("gemma3"))
    target.config.text_config.sliding_window = 8
    for layer in target.model.language_model.layers:
        if layer.self_attn.is_sliding:
            layer.self_attn.sliding_window = 8
    rows = ragged_rows(target)
    batch = stack_tiny_inputs(target, rows)
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    alone = new_tokens_alone(target, rows, **greedy)
    drafter = row_oracle(target, {r: torch.cat([rows[r]["input_ids"][0], alone[r]]) for r in range(3)})
    output = target.generate(**batch, **greedy, assistant_model=drafter)
    assert_rows_match(output, batch["input_ids"].shape[1], alone, target.tiny_spec.pad_token_id)
    assert drafter.last_stats["target_cache_compactions"] > 0
    assert drafter.last_stats["acceptance_length"] > 2.0


def test_prefix_dependent_processors_and_adaptive_draft_length():
    """Processors that read each row's prefix (repetition penalty with per-row prompt padding,
    min_new_tokens, no_repeat_ngram) see exactly what plain batched generate shows them."""
    target = cached_target("llava")
    rows = ragged_rows(target)
    batch = stack_tiny_inputs(target, rows)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=1.3, min_new_tokens=12, no_repeat_ngram_size=2)
    plain = target.generate(**batch, **kwargs)
    alone = [plain[r, batch["input_ids"].shape[1] :] for r in range(3)]
    sequences = {r: torch.cat([rows[r]["input_ids"][0], alone[r]]) for r in range(3)}
    drafter = row_oracle(target, sequences, draft_schedule="heuristic", num_draft_tokens=2)
    output = target.generate(**batch, **kwargs, assistant_model=drafter)
    assert torch.equal(output, plain)
    assert torch.equal(new_tokens_alone(target, rows[:1], **kwargs)[0], alone[0])
    assert len({d for r in drafter.last_stats["rows"] for d in r["drafted_per_pass"]}) > 1


def test_other_stopping_criteria_are_applied_per_row():
    """A user stopping criterion (here: stop after a given token) ends rows one by one, on each
    row's own sequence, as in plain generate."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfter(StoppingCriteria):
        def __init__(self, token):
            self.token = token

        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == self.token

    target = cached_target("idefics3")
    rows = ragged_rows(target)
    batch = stack_tiny_inputs(target, rows)
    long_run = new_tokens_alone(target, rows, max_new_tokens=NEW_TOKENS, do_sample=False)
    stop = int(long_run[1][5])
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, stopping_criteria=StoppingCriteriaList([StopAfter(stop)]))
    plain = target.generate(**batch, **kwargs)
    drafter = row_oracle(target, {r: torch.cat([rows[r]["input_ids"][0], long_run[r]]) for r in range(3)})
    output = target.generate(**batch, **kwargs, assistant_model=drafter)
    assert torch.equal(output, plain)
    assert output.shape[1] - batch["input_ids"].shape[1] == NEW_TOKENS  # not every row stopped
    assert drafter.last_stats["rows"][1]["new_tokens"] <= 6


def test_batch_of_one_through_batched_generate_matches_chain_decoding():
    target = cached_target("idefics3")
    inputs = make_tiny_inputs(target, seed=1)
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    reference = target.generate(**inputs, **greedy)
    drafter = row_oracle(target, {0: reference[0]})
    chain = target.generate(**inputs, **greedy, assistant_model=drafter)
    chain_stats = dict(drafter.last_stats)
    output = target.generate(**inputs, **greedy, custom_generate=batched_generate, drafter=drafter)
    assert torch.equal(output, reference) and torch.equal(chain, reference)
    row = drafter.last_stats["rows"][0]
    for key in ("target_passes", "accepted_per_pass", "drafted_per_pass", "acceptance_length", "visual_tokens_kept"):
        assert row[key] == chain_stats[key]
    assert drafter.last_stats["acceptance_length"] == chain_stats["acceptance_length"]


def test_scores_and_streamer_follow_plain_generate():
    target = cached_target("pixtral")
    rows = ragged_rows(target)
    batch = stack_tiny_inputs(target, rows)
    kwargs = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_scores=True)
    plain_tokens = new_tokens_alone(target, rows, max_new_tokens=12, do_sample=False)
    eos = int(plain_tokens[0][3])  # row 0 stops after 4 tokens
    plain = target.generate(**batch, **kwargs, eos_token_id=eos)
    sequences = {r: torch.cat([rows[r]["input_ids"][0], plain_tokens[r]]) for r in range(3)}

    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value)

        def end(self):
            self.ended = True

    streamer = Recorder()
    output = target.generate(**batch, **kwargs, eos_token_id=eos, assistant_model=row_oracle(target, sequences), streamer=streamer)
    assert torch.equal(output.sequences, plain.sequences)
    lengths = (output.sequences[:, batch["input_ids"].shape[1] :] != target.tiny_spec.pad_token_id).sum(1)
    assert len(output.scores) == len(plain.scores) == 12
    for step, (mine, theirs) in enumerate(zip(output.scores, plain.scores)):
        live = step < lengths  # plain generate keeps scoring finished rows; those are not compared
        torch.testing.assert_close(mine[live], theirs[live], atol=1e-4, rtol=1e-4)
    assert streamer.ended and torch.equal(streamer.chunks[0], batch["input_ids"])
    assert torch.equal(torch.stack(streamer.chunks[1:], dim=1), plain.sequences[:, batch["input_ids"].shape[1] :])


# --- the ragged cache ------------------------------------------------------------------------------
def test_compaction_keeps_each_rows_entries_in_order():
    from transformers import DynamicCache

    cache = DynamicCache()
    keys = torch.arange(2 * 6, dtype=torch.float).reshape(2, 1, 6, 1)
    cache.update(keys, keys + 100, 0)
    valid = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    ragged = RaggedCache(cache, valid)
    ragged.settle()  # waste = 6 - 5 columns: under the threshold, nothing moves
    assert ragged.compactions == 0 and ragged.length == 6
    ragged.compact()
    assert ragged.valid.tolist() == [[False, False, True, True, True], [True] * 5]
    assert cache.layers[0].keys[0, 0, 2:, 0].tolist() == [1.0, 2.0, 4.0]
    assert cache.layers[0].keys[1, 0, :, 0].tolist() == [6.0, 7.0, 9.0, 10.0, 11.0]
    assert cache.layers[0].values[1, 0, :, 0].tolist() == [106.0, 107.0, 109.0, 110.0, 111.0]


# --- sampling ------------------------------------------------------------------------------------
COPIES = 16  # each prompt repeated in one batch: 16 independent samples per generate call
CALLS = 50


@pytest.fixture(scope="module")
def sampling_setup():
    from test_sampling import GENERATE_KWARGS, VOCAB, exact_token_marginals

    target = build_tiny_target("llava", seed=11, vocab_size=VOCAB)
    with torch.no_grad():  # peaked, image-dependent distributions make the test sharp
        target.lm_head.weight.mul_(40.0)
    inputs = make_tiny_inputs(target, seed=6, batch_size=2)  # two prompts of different lengths
    prompts = [tiny_inputs_row(target, inputs, r) for r in range(2)]
    # 4 new tokens: the first round drafts 2, so tokens 2 and 3 come from acceptances,
    # residual draws and bonus tokens
    kwargs = dict(GENERATE_KWARGS, suppress_tokens=sorted(target.tiny_spec.special_token_ids), max_new_tokens=4)
    marginals = [exact_token_marginals(target, prompt, kwargs) for prompt in prompts]
    torch.manual_seed(0)
    drafter = DreamDraftModel.from_target(target, num_draft_tokens=2, visual_keep_ratio=0.75)
    with torch.no_grad():  # a drafter that really disagrees with the target
        drafter.cross_block.attn_gate.fill_(1.0)
    return target, prompts, kwargs, drafter, marginals


def sample_rows(target, prompts, kwargs, drafter):
    """New tokens per prompt, COPIES * CALLS samples each, from ragged batches of all prompts."""
    batch = stack_tiny_inputs(target, prompts * COPIES)
    width = batch["input_ids"].shape[1]
    tokens, accepted, drafted = [[] for _ in prompts], 0, 0
    for seed in range(CALLS):
        torch.manual_seed(seed)
        output = target.generate(**batch, **kwargs, assistant_model=drafter)
        for row in range(output.shape[0]):
            tokens[row % len(prompts)].append(output[row, width:])
        accepted += drafter.last_stats["accepted_tokens"]
        drafted += drafter.last_stats["drafted_tokens"]
    return [torch.stack(t) for t in tokens], accepted, drafted


def test_batched_sampling_matches_plain_sampling_per_row(sampling_setup):
    from test_sampling import goodness_of_fit

    target, prompts, kwargs, drafter, marginals = sampling_setup
    for p2, p3 in marginals:
        assert p2.max() < 0.9 and p3.max() < 0.9  # the drafts really get rejected sometimes
    tokens, accepted, drafted = sample_rows(target, prompts, kwargs, drafter)
    assert 0 < accepted < drafted  # acceptances and rejections both happened
    for row_tokens, (p2, p3) in zip(tokens, marginals):
        assert goodness_of_fit(row_tokens[:, 1], p2) > 1e-3
        assert goodness_of_fit(row_tokens[:, 2], p3) > 1e-3


def test_forgetting_the_residual_fails_the_same_test(sampling_setup, monkeypatch):
    """A wrong implementation: after a rejection the next token is drawn from the target
    distribution instead of the residual max(p - q, 0), which favours drafted tokens."""
    from test_sampling import goodness_of_fit

    target, prompts, kwargs, drafter, marginals = sampling_setup
    monkeypatch.setattr(engine, "residual_distribution", lambda p, q: p)
    tokens, _, _ = sample_rows(target, prompts, kwargs, drafter)
    pvalues = [goodness_of_fit(t[:, i], m[i - 1]) for t, m in zip(tokens, marginals) for i in (1, 2)]
    assert min(pvalues) < 1e-3
