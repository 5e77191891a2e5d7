"""Checks shared by every DREAM decoding entry point (assisted chain, batched, tree), so that a
bad call fails the same way, with the same message, wherever it comes in."""

from __future__ import annotations


def check_dream_call(target, drafter, generation_config, usage: str) -> None:
    """Errors for settings no DREAM loop can honour. `usage` shows how to pass a drafter."""
    from ..modeling_dream import DreamDraftModel

    if not isinstance(drafter, DreamDraftModel):
        raise ValueError(f"This needs a DREAM drafter: {usage} (got drafter={type(drafter).__name__}).")
    if generation_config.num_beams not in (None, 1) or generation_config.num_return_sequences not in (None, 1):
        raise ValueError("A DREAM drafter supports greedy decoding and sampling (num_beams=1, num_return_sequences=1).")
    if generation_config.prompt_lookup_num_tokens is not None:
        raise ValueError("`prompt_lookup_num_tokens` and a DREAM drafter are mutually exclusive.")
    if generation_config.cache_implementation not in (None, "dynamic") or generation_config.use_cache is False:
        raise ValueError(
            "DREAM decoding needs the default dynamic cache (use_cache=True), got "
            f"cache_implementation={generation_config.cache_implementation!r}."
        )
    drafter.attach_target(target)  # model type / hidden size / vocab checks
    target_device = target.get_input_embeddings().weight.device
    if drafter.device != target_device:
        raise ValueError(
            f"The DREAM drafter is on {drafter.device} but the target's embeddings are on {target_device}; "
            f"move it with `drafter.to({str(target_device)!r})`."
        )


def check_custom_masks(target, why: str) -> None:
    """Our own loops pass masks that flash-attention kernels do not take."""
    attention = str(getattr(target.config.get_text_config(), "_attn_implementation", None))
    if "flash" in attention:
        raise ValueError(f"{why}, which {attention} does not take; load the target with attn_implementation='sdpa' or 'eager'.")
