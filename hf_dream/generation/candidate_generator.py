"""DREAM chain drafting behind transformers' `CandidateGenerator` interface.

The target's assisted-decoding loop (`GenerationMixin._assisted_decoding`) calls
`get_candidates` before every verification pass and hands over the previous pass's outputs
(`requires_model_outputs`), so the drafter reads the target's last-layer features of every
verified token without an extra target forward. The first call returns no candidates: the
target's prefill runs alone and gives the drafter the prompt's features, its merged
image+text embeddings and the attention that ranks visual tokens for compression. Every piece of
drafter-side state lives in a batch-of-one [`DrafterState`], as in the custom loops.

Stopping inside a draft: transformers' loop crops an accepted block only at EOS and
`max_length`, and checks the other stopping criteria (stop strings, user criteria) on the whole
block. So drafting stops after the first drafted token at which one of them fires (as it does
after a drafted EOS; nothing after it could be kept), and for that round the generation config's
`max_length` ends at that token, so the loop's own length crop cuts the block exactly where plain
decoding stops, if the token is accepted. The draft itself is unchanged up to there, so greedy
output and the sampling distribution stay the target's.
"""

from __future__ import annotations

import torch
from transformers.generation import CandidateGenerator

from .drafter_state import DrafterState
from .engine import RowStopper
from .stats import DecodingStats
from .validation import check_dream_inputs


class DreamCandidateGenerator(CandidateGenerator):
    """Drafts `num_draft_tokens` tokens per round with a [`DreamDraftModel`] (`options`: this call's
    [`DreamDecodingOptions`], default: `drafter.decoding_options`; `generate()` keywords reach it
    through the hook).

    Lossless by construction: greedy drafts are compared with the target's argmax by the
    generate loop; sampled drafts are drawn from the drafter's distribution *after* the same
    logits processors as the target's, and those processed logits are returned as
    `candidate_logits` for transformers' speculative-sampling acceptance test.
    """

    requires_model_outputs = True

    def __init__(self, target, drafter, input_ids, generation_config, logits_processor, stopping_criteria=None, model_kwargs=None,
                 options=None):
        if input_ids.shape[0] != 1:
            raise ValueError(f"DREAM decoding supports batch size 1 for now, got {input_ids.shape[0]}.")
        check_dream_inputs(input_ids, model_kwargs or {})
        self.drafter = drafter
        self.state = DrafterState(target, drafter, 1, input_ids.device, track_rows=False, options=options)
        self.logits_processor = logits_processor
        self.do_sample = bool(generation_config.do_sample)
        self.generation_config = generation_config  # this call's copy: its max_length ends a round at a stop
        self.max_length = generation_config.max_length
        self.stopper = RowStopper(stopping_criteria, generation_config, input_ids.shape[1])
        eos = getattr(generation_config, "_eos_token_tensor", None)
        self.eos_token_ids = None if eos is None else eos.reshape(-1)
        self.prompt_length = input_ids.shape[1]
        self.num_drafted = 0
        self._feature_layers = drafter.target_feature_layers
        # the drafter reads the embeddings (layer 0, at prefill) and its feature layers (the last one; EAGLE-3-style
        # drafters several); every layer when the caller asked for hidden states (transformers' loop then returns them all)
        self._all_layers = bool(generation_config.return_dict_in_generate and generation_config.output_hidden_states)
        self.model_kwargs_overrides = {"output_hidden_states": True if self._all_layers else sorted({0, *self._feature_layers})}
        self.stats = DecodingStats.new(1)
        self.stats.publish(drafter)

    def close(self) -> None:
        """End of the call, successful or not (the hook calls it): nothing stays on the target."""
        self.generation_config.max_length = self.max_length
        self.state.close()

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
                # the target's positions of the prompt: the position ids transformers' loop gave it (3-D for M-RoPE)
                positions = state.adapter.target_positions(input_ids[:, :prompt], mask, model_kwargs or {})
                embeds, features = state.prompt_view(input_ids[:, :prompt], mask, hidden_states)
                output = state.prefill(input_ids[:, :prompt], mask, embeds, features, input_ids[:, prompt], positions)
                self.stats.record_visual(state)
                if not self._all_layers:
                    self.model_kwargs_overrides = {"output_hidden_states": self._feature_layers}
            else:  # the pass covered [previous bonus token, drafts...]; n_last_matches + 1 of them are kept
                new_tokens = input_ids[0, int(state.lengths[0]) :].tolist()
                output = state.catch_up([new_tokens], self.drafter.fuse_target_features(hidden_states)[:, : n_last_matches + 1])
            candidates, candidate_logits = self._draft(input_ids, output)
        self.num_drafted = candidates.shape[1] - input_ids.shape[1]
        self.stats.record_pass([self.num_drafted])
        return candidates, candidate_logits

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        self.generation_config.max_length = self.max_length  # the loop has cropped this round's block
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

        drafted: list[int] = []

        def stops(token):  # a drafted EOS, or a drafted token at which another stopping criterion fires
            drafted.append(int(token[0]))
            return self._is_eos(token) | self.stopper.fires(input_ids[0], drafted)

        draft = self.state.draft_chain(output, limits, process, self.do_sample, self._is_eos if self.stopper.others is None else stops)
        if draft.tokens.shape[1] == 0:
            return input_ids, None
        if self.stopper.others is not None and bool(self.stopper.fires(input_ids[0], draft.tokens[0].tolist())):
            # the loop crops at max_length only: end this round's block at the stopping token
            self.generation_config.max_length = input_ids.shape[1] + draft.tokens.shape[1]
        return torch.cat([input_ids, draft.tokens], dim=1), draft.scores

    def _is_eos(self, tokens) -> torch.Tensor:
        if self.eos_token_ids is None:
            return torch.zeros_like(tokens, dtype=torch.bool)
        return torch.isin(tokens, self.eos_token_ids.to(tokens.device))
