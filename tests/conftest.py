"""Shared fixtures: tiny random targets (built offline from configs) and an oracle drafter."""

from __future__ import annotations

import functools
import random

import pytest
import torch

import hf_dream  # noqa: F401  (installs the generate() hook)
from hf_dream import DreamDecodingOptions, DreamDraftModel, DreamDraftOutput
from hf_dream.testing import SUPPORTED_TINY_FAMILIES, build_tiny_target, make_tiny_inputs

# Tiny models: torch's intra-op thread pool only adds overhead (and thrashes on a busy 2-core box).
torch.set_num_threads(1)


@functools.cache
def cached_target(family: str, seed: int = 0, vocab_size: int | None = None):
    return build_tiny_target(family, seed=seed, vocab_size=vocab_size)


@pytest.fixture(params=SUPPORTED_TINY_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def target(family):
    return cached_target(family)


@pytest.fixture
def inputs(target):
    return make_tiny_inputs(target, seed=1)


def check_stats(stats: dict, prompt_length: int, output: torch.Tensor) -> None:
    """`last_stats` agrees with itself and with the output (chain and tree drafting)."""
    new_tokens = output.shape[1] - prompt_length
    assert stats["new_tokens"] == new_tokens
    # the prefill pass drafts nothing: one drafted_per_pass entry per later pass
    assert stats["target_passes"] == len(stats["accepted_per_pass"]) == len(stats["drafted_per_pass"]) + 1
    assert stats["accepted_tokens"] == sum(stats["accepted_per_pass"])
    assert stats["drafted_tokens"] == sum(stats["drafted_per_pass"])
    assert sum(a + 1 for a in stats["accepted_per_pass"]) == new_tokens
    assert stats["acceptance_length"] == pytest.approx(new_tokens / stats["target_passes"])


def is_corrupted(position: int) -> bool:
    """Deterministic pseudo-random ~25% of positions where the oracle drafter proposes a wrong token."""
    return random.Random(position).random() < 0.25


class OracleDraftModel(DreamDraftModel):
    """A drafter that knows the target's greedy continuation and corrupts some positions.

    It runs the real DREAM network (so caches, feature memory and compression are exercised)
    and then overrides the logits: at input position p it predicts token `oracle[p + 1]`,
    except at corrupted positions. Rounds with no, partial and full acceptance all occur.
    """

    oracle: torch.Tensor | None = None
    corrupted = staticmethod(is_corrupted)

    def forward(self, inputs_embeds, position_ids, *args, **kwargs) -> DreamDraftOutput:
        output = super().forward(inputs_embeds, position_ids, *args, **kwargs)
        logits = torch.full_like(output.logits, -10.0)
        for index, position in enumerate(position_ids[0].tolist()):
            nxt = position + 1
            token = int(self.oracle[nxt]) % logits.shape[-1] if nxt < len(self.oracle) else 0
            if self.corrupted(nxt):
                token = (token + 1) % logits.shape[-1]
            logits[0, index, token] = 10.0
        output.logits = logits
        return output


def build_drafter(cls, target, **overrides):
    """`cls(config for target)`: `overrides` are DreamConfig fields or decoding options (the drafter's defaults)."""
    options = {name: overrides.pop(name) for name in DreamDecodingOptions.names() if name in overrides}
    drafter = cls(DreamDraftModel.config_for_target(target, **overrides))
    drafter.decoding_options = drafter.decoding_options.updated(**options)
    return drafter


def oracle_drafter(target, sequence: torch.Tensor, cls=None, **overrides) -> OracleDraftModel:
    """An oracle drafter (`cls`, an OracleDraftModel by default) for `target`'s output `sequence`."""
    drafter = build_drafter(cls or OracleDraftModel, target, **overrides)
    drafter.attach_target(target)
    drafter.oracle = sequence[0]
    return drafter
