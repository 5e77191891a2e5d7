"""Checks shared by every DREAM decoding entry point (assisted chain, batched, tree), so that a
bad call fails the same way, with the same message, wherever it comes in."""

from __future__ import annotations


def check_dream_call(target, drafter, generation_config, usage: str, custom_mask: str | None = None) -> None:
    """Errors for settings no DREAM loop can honour. `usage` shows how to pass a drafter; `custom_mask`
    (the custom loops): what their verification masks do, which flash-attention kernels do not take."""
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
    attention = str(getattr(target.config.get_text_config(), "_attn_implementation", None))
    if generation_config.output_attentions and generation_config.return_dict_in_generate and attention != "eager":
        raise ValueError(
            f"`output_attentions=True` needs the target loaded with attn_implementation='eager' ({attention} returns no "
            "attention weights, so there are none to return for the verified tokens)."
        )
    drafter.attach_target(target)  # model type / hidden size / vocab checks
    target_device = target.get_input_embeddings().weight.device
    if drafter.device != target_device:
        raise ValueError(
            f"The DREAM drafter is on {drafter.device} but the target's embeddings are on {target_device}; "
            f"move it with `drafter.to({str(target_device)!r})`."
        )
    if custom_mask is not None and "flash" in attention:
        raise ValueError(
            f"{custom_mask}, which {attention} does not take; load the target with attn_implementation='sdpa' or 'eager'."
        )


def check_dream_inputs(input_ids, model_kwargs) -> None:
    """Errors for inputs no DREAM loop can decode from, raised before the target's prefill."""
    if input_ids is None or input_ids.shape[-1] == 0:
        raise ValueError(
            "DREAM decoding needs the prompt as `input_ids` (the drafter reads token ids, and the visual-token "
            "compression needs to know which positions are image tokens); prompts given only as `inputs_embeds` "
            "are not supported. Pass `input_ids` (with `pixel_values` for the images) instead of `inputs_embeds`."
        )
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(
            f"DREAM decoding starts from an empty cache, but this call passes a cache that already holds "
            f"{cache.get_seq_length()} positions (`past_key_values` / `cache` of an earlier turn): continuing from it "
            "is not supported (the drafter has no features of the cached positions). Pass the whole conversation "
            "as `input_ids` (with its images) and no `past_key_values`."
        )


def check_custom_loop_outputs(generation_config, mode: str) -> None:
    """Outputs the custom loops (tree, batch) do not collect: refused instead of silently left out."""
    if not generation_config.return_dict_in_generate:
        return
    for option in ("output_hidden_states", "output_attentions"):
        if getattr(generation_config, option, False):
            raise ValueError(
                f"`{option}=True` is not supported by {mode} DREAM decoding (it verifies draft tokens it may reject, "
                f"so the target's per-step {option[7:]} are not collected). Drop `{option}`, or decode one prompt "
                "with `assistant_model=drafter` (the chain path), which returns them as transformers' assisted "
                "decoding does."
            )
