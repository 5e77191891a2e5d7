"""DREAM's distillation losses (paper, section 4): KL on token distributions plus SmoothL1 on
the final features and on the first block's output against an intermediate target layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` (b, k) over `mask`; 0 (with a gradient path) when the mask is empty."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def kl_target_to_draft(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    """KL(target || draft) per position, summed over the vocabulary: (b, k)."""
    target_logp = target_logits.float().log_softmax(-1)
    draft_logp = draft_logits.float().log_softmax(-1)
    return (target_logp.exp() * (target_logp - draft_logp)).sum(-1)


def smooth_l1(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SmoothL1 per position, averaged over the hidden dimension: (b, k)."""
    return F.smooth_l1_loss(prediction.float(), target.float(), reduction="none").mean(-1)


def dream_losses(draft, teacher_logits, teacher_features, teacher_mid, mask) -> dict[str, torch.Tensor]:
    """The three loss terms over the positions in `mask` (b, k); teacher tensors are already
    gathered at the drafter's positions. `teacher_mid=None` disables the intermediate term."""
    losses = {
        "kl": masked_mean(kl_target_to_draft(teacher_logits, draft.logits), mask),
        "final": masked_mean(smooth_l1(draft.features, teacher_features), mask),
    }
    if teacher_mid is not None:
        losses["mid"] = masked_mean(smooth_l1(draft.first_block_hidden, teacher_mid), mask)
    return losses


def top1_agreement(teacher, draft_logits, mask, draft_vocab: torch.Tensor | None = None) -> tuple[int, int]:
    """(agreeing positions, positions) of the argmax tokens over `mask`. `teacher`: the target's logits over its full
    vocabulary, or (an integer tensor) its argmax ids themselves; with a reduced draft vocabulary, draft argmaxes are
    mapped to target ids."""
    draft_top = draft_logits.argmax(-1)
    if draft_vocab is not None:
        draft_top = draft_vocab[draft_top]
    teacher_top = teacher if not teacher.is_floating_point() else teacher.argmax(-1)
    agree = (teacher_top == draft_top) & mask
    return int(agree.sum()), int(mask.sum())
