"""DREAM chain drafting behind transformers' `CandidateGenerator` interface.

The target's assisted-decoding loop (`GenerationMixin._assisted_decoding`) calls
`get_candidates` before every verification pass and hands over the previous pass's outputs
(`requires_model_outputs`), so the drafter reads the target's last-layer features of every
verified token without an extra target forward. The first call returns no candidates: the
target's prefill runs alone and gives the drafter the prompt's features, its merged
image+text embeddings and the attention that ranks visual tokens for compression. Every piece of
drafter-side state lives in a batch-of-one [`DrafterState`], as in the custom loops.
"""

from __future__ import annotations

import torch
from transformers.generation import CandidateGenerator

from .drafter_state import DrafterState
from .stats import DecodingStats


class DreamCandidateGenerator(CandidateGenerator):
    """Drafts `num_draft_tokens` tokens per round with a [`DreamDraftModel`].

    Lossless by construction: greedy drafts are compared with the target's argmax by the
    generate loop; sampled drafts are drawn from the drafter's distribution *after* the same
    logits processors as the target's, and those processed logits are returned as
    `candidate_logits` for transformers' speculative-sampling acceptance test.
    """

    requires_model_outputs = True

    def __init__(self, target, drafter, input_ids, generation_config, logits_processor):
        if input_ids.shape[0] != 1:
            raise ValueError(f"DREAM decoding supports batch size 1 for now, got {input_ids.shape[0]}.")
        self.drafter = drafter
        self.state = DrafterState(target, drafter, 1, input_ids.device, track_rows=False)
        self.logits_processor = logits_processor
        self.do_sample = bool(generation_config.do_sample)
        self.max_length = generation_config.max_length
        eos = getattr(generation_config, "_eos_token_tensor", None)
        self.eos_token_ids = None if eos is None else eos.reshape(-1)
        self.prompt_length = input_ids.shape[1]
        self.num_drafted = 0
        self._last_layer = self.state.adapter.num_hidden_layers
        self.model_kwargs_overrides = {"output_hidden_states": [0, self._last_layer]}
        self.stats = DecodingStats.new(1)
        self.stats.publish(drafter)

    def get_candidates(self, input_ids, model_kwargs=None, model_outputs=None, is_first_iteration=False, n_last_matches=0):
        state = self.state
        if is_first_iteration:
            self.stats.record_pass(None)
            state.start_prefill(input_ids)
            return input_ids, None
        hidden_states = model_outputs.hidden_states
        with torch.no_grad():
            if int(state.lengths[0]) == 0:  # the prefill covered every prompt position
                prompt = hidden_states[0].shape[1]
                mask = torch.ones_like(input_ids[:, :prompt], dtype=torch.bool)
                output = state.prefill(input_ids[:, :prompt], mask, hidden_states[0], hidden_states[self._last_layer], input_ids[:, prompt])
                self.stats.record_visual(state)
                self.model_kwargs_overrides = {"output_hidden_states": [self._last_layer]}
            else:  # the pass covered [previous bonus token, drafts...]; n_last_matches + 1 of them are kept
                new_tokens = input_ids[0, int(state.lengths[0]) :].tolist()
                output = state.catch_up([new_tokens], hidden_states[self._last_layer][:, : n_last_matches + 1])
            candidates, candidate_logits = self._draft(input_ids, output)
        self.num_drafted = candidates.shape[1] - input_ids.shape[1]
        self.stats.record_pass([self.num_drafted])
        return candidates, candidate_logits

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        num_matches = int(num_matches)
        new_tokens = input_ids.shape[1] - self.prompt_length - self.stats.rows[0].new_tokens
        self.stats.record_acceptance([num_matches], [new_tokens])
        self.stats.publish(self.drafter)
        device = self.state.lengths.device
        self.state.schedule.record(torch.tensor([self.num_drafted], device=device), torch.tensor([num_matches], device=device))

    def _draft(self, input_ids, output):
        """Candidates `(1, length + k)` and, when sampling, their processed draft logits `(1, k, vocab)`."""
        budget = self.max_length - input_ids.shape[1] - 1  # the verification pass adds one token itself
        limits = self.state.schedule.next_lengths(self.state).clamp(max=max(budget, 0))

        def process(logits, drafted):
            return self.logits_processor(torch.cat([input_ids, *[t[:, None] for t in drafted]], dim=1), logits)

        draft = self.state.draft_chain(output, limits, process, self.do_sample, self._is_eos)
        if draft.tokens.shape[1] == 0:
            return input_ids, None
        return torch.cat([input_ids, draft.tokens], dim=1), draft.scores

    def _is_eos(self, tokens) -> torch.Tensor:
        if self.eos_token_ids is None:
            return torch.zeros_like(tokens, dtype=torch.bool)
        return torch.isin(tokens, self.eos_token_ids.to(tokens.device))
