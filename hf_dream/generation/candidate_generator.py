"""DREAM chain drafting behind transformers' `CandidateGenerator` interface.

The target's assisted-decoding loop (`GenerationMixin._assisted_decoding`) calls
`get_candidates` before every verification pass and hands over the previous pass's outputs
(`requires_model_outputs`), so the drafter reads the target's last-layer features of every
verified token without an extra target forward. The first call returns no candidates: the
target's prefill runs alone and gives the drafter the prompt's features, its merged
image+text embeddings and the attention that ranks visual tokens for compression.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.generation import CandidateGenerator

from ..features import AttentionInputRecorder, attention_received, select_visual_tokens
from .draft_length import DraftLengthChooser


def new_stats() -> dict:
    """A zeroed decoding-statistics dict (passes, drafted/accepted tokens, visual tokens), as kept in `last_stats`."""
    return {
        "target_passes": 0,
        "drafted_tokens": 0,
        "accepted_tokens": 0,
        "new_tokens": 0,
        "acceptance_length": 0.0,
        "accepted_per_pass": [],
        "drafted_per_pass": [],
        "visual_tokens": 0,
        "visual_tokens_kept": 0,
    }


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
        self.adapter = drafter.attach_target(target)
        self.logits_processor = logits_processor
        self.do_sample = bool(generation_config.do_sample)
        self.max_length = generation_config.max_length
        self.num_draft_tokens = drafter.config.num_draft_tokens
        self.adaptive = drafter.config.draft_schedule == "heuristic"
        self.length_chooser = DraftLengthChooser(target, drafter) if drafter.config.draft_schedule == "auto" else None
        eos = getattr(generation_config, "_eos_token_tensor", None)
        self.eos_token_ids = None if eos is None else eos.reshape(-1)
        self.prompt_length = input_ids.shape[1]

        self.cache = DynamicCache()
        self.memory = drafter.new_memory()
        self.num_pruned = 0  # prompt positions the drafter never saw (visual compression)
        self.draft_positions = 0  # sequence positions already in the drafter's cache with real features
        self.num_drafted = 0
        last_layer = self.adapter.num_hidden_layers
        self.model_kwargs_overrides = {"output_hidden_states": [0, last_layer]}
        self._last_layer = last_layer
        self._importance_recorder: AttentionInputRecorder | None = None
        self.stats = new_stats()
        drafter.last_stats = self.stats

    # --- the CandidateGenerator interface --------------------------------------------------
    def get_candidates(self, input_ids, model_kwargs=None, model_outputs=None, is_first_iteration=False, n_last_matches=0):
        self.stats["target_passes"] += 1
        if is_first_iteration:
            self.start_prefill(input_ids)
            return input_ids, None

        hidden_states = model_outputs.hidden_states
        prompt_embeds = hidden_states[0] if self.draft_positions == 0 else None
        with torch.no_grad():
            output = self.catch_up(input_ids, hidden_states[self._last_layer], n_last_matches, prompt_embeds)
            if self.length_chooser is not None:
                if self.length_chooser.costs is None:
                    self.length_chooser.measure(self, input_ids.shape[1])
                self.num_draft_tokens = self.length_chooser.next_length()
            candidates, candidate_logits = self._draft(input_ids, output)
        self.num_drafted = candidates.shape[1] - input_ids.shape[1]
        self.stats["drafted_tokens"] += self.num_drafted
        self.stats["drafted_per_pass"].append(self.num_drafted)
        return candidates, candidate_logits

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        num_matches = int(num_matches)
        self.stats["accepted_tokens"] += num_matches
        self.stats["accepted_per_pass"].append(num_matches)
        self.stats["new_tokens"] = input_ids.shape[1] - self.prompt_length
        self.stats["acceptance_length"] = self.stats["new_tokens"] / self.stats["target_passes"]
        if self.length_chooser is not None:
            self.length_chooser.record(self.num_drafted, num_matches)
        if self.adaptive and self.num_drafted > 0:
            # transformers' "heuristic" schedule: grow after a fully accepted draft, shrink otherwise
            fully_accepted = num_matches == self.num_drafted
            self.num_draft_tokens = self.num_draft_tokens + 2 if fully_accepted else max(1, self.num_draft_tokens - 1)

    # --- drafter state (shared with tree drafting) -------------------------------------------
    def start_prefill(self, input_ids) -> None:
        """Call before the target's prefill: records what ranks visual tokens for compression."""
        if self.drafter.config.visual_keep_ratio < 1.0 and self.adapter.image_token_mask(input_ids).any():
            last_attention = self.adapter.decoder_layers[-1].self_attn
            self._importance_recorder = AttentionInputRecorder({0: last_attention}).start()

    def _prefill_inputs(self, input_ids, prompt_embeds):
        """Drafter inputs after the target's prefill: the prompt's merged embeddings with the
        least-attended visual tokens dropped, plus the target's first new token."""
        prompt_length = prompt_embeds.shape[1]
        image_mask = self.adapter.image_token_mask(input_ids[:, :prompt_length])
        keep = torch.ones_like(image_mask)
        if self._importance_recorder is not None:
            self._importance_recorder.stop()
            hidden_states, position_embeddings = self._importance_recorder.inputs[0]
            self._importance_recorder = None
            importance = attention_received(self.adapter.decoder_layers[-1].self_attn, hidden_states, position_embeddings)
            keep = select_visual_tokens(importance, image_mask, self.drafter.config.visual_keep_ratio)
        self.stats["visual_tokens"] = int(image_mask.sum())
        self.stats["visual_tokens_kept"] = int((keep & image_mask).sum())
        self.num_pruned = int((~keep).sum())
        positions = keep[0].nonzero().squeeze(-1)
        embeds = torch.cat([prompt_embeds[:, positions], self.adapter.embed(input_ids[:, prompt_length:])], dim=1)
        positions = torch.cat([positions, torch.arange(prompt_length, input_ids.shape[1], device=positions.device)])
        return embeds, positions[None]

    def catch_up(self, input_ids, features, num_accepted: int, prompt_embeds=None):
        """Replace speculative state by the target's verified features and run the drafter over
        the tokens it has not seen with real features (accepted drafts and the bonus token).

        `features` are the target's last-layer features of its last pass: after the prefill,
        every prompt position (then `prompt_embeds`, the prefill's input embeddings, is needed);
        after a verification, the pass's positions, of which the first `num_accepted + 1` are
        now part of the sequence. Returns the drafter's output for those tokens."""
        if self.draft_positions == 0:
            self.memory.append(features)  # every prompt position
            embeds, positions = self._prefill_inputs(input_ids, prompt_embeds)
            self.model_kwargs_overrides = {"output_hidden_states": [self._last_layer]}
        else:
            # The verification pass covered [previous bonus token, drafts...]; its first
            # n_last_matches + 1 positions are now part of the sequence.
            self.memory.crop(self.draft_positions - 1)
            self.memory.append(features[:, : num_accepted + 1])
            self.cache.crop(-(self.cache.get_seq_length() - (self.draft_positions - self.num_pruned)))
            positions = torch.arange(self.draft_positions, input_ids.shape[1], device=input_ids.device)[None]
            embeds = self.adapter.embed(input_ids[:, self.draft_positions :])
        self.draft_positions = input_ids.shape[1]
        return self.drafter(embeds, positions, memory=self.memory, cache=self.cache)

    # --- chain drafting ----------------------------------------------------------------------
    def _draft(self, input_ids, output):
        budget = self.max_length - input_ids.shape[1] - 1  # the verification pass adds one token itself
        num_tokens = min(self.num_draft_tokens, budget)
        candidates, processed_logits = input_ids, []
        for step in range(num_tokens):
            logits = self.logits_processor(candidates, self.drafter.to_target_vocab(output.logits[:, -1].float()))
            if self.do_sample:
                token = torch.multinomial(logits.softmax(dim=-1), num_samples=1)
            else:
                token = logits.argmax(dim=-1, keepdim=True)
            candidates = torch.cat([candidates, token], dim=1)
            processed_logits.append(logits)
            if step == num_tokens - 1 or self._is_eos(token):
                break
            # The drafted token's position sees the drafter's own feature of the previous
            # position until the target has verified it (cropped in the next `catch_up`).
            self.memory.append(output.features[:, -1:])
            position = torch.tensor([[candidates.shape[1] - 1]], device=input_ids.device)
            output = self.drafter(self.adapter.embed(token), position, memory=self.memory, cache=self.cache)
        if not processed_logits:
            return input_ids, None
        candidate_logits = torch.stack(processed_logits, dim=1) if self.do_sample else None
        return candidates, candidate_logits

    def _is_eos(self, token) -> bool:
        return self.eos_token_ids is not None and bool(torch.isin(token, self.eos_token_ids.to(token.device)).any())
