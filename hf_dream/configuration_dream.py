"""Configuration of DREAM draft models."""

from __future__ import annotations

import difflib
import warnings

from transformers import PreTrainedConfig

FUSION_MODES = ("cross_attention", "concat", "cross_attention_concat")
CROSS_ATTENTION_FUSIONS = ("cross_attention", "cross_attention_concat")
DRAFT_SCHEDULES = ("constant", "heuristic", "auto")
# The fields of `hf_dream.generation.options.DreamDecodingOptions` (this module imports no other hf_dream
# module: it is exported as-is for `trust_remote_code` users), which earlier releases saved in config.json.
DECODING_OPTION_NAMES = ("num_draft_tokens", "draft_schedule", "tree_top_k", "tree_depth", "tree_total_tokens", "drafter_image")


class DreamConfig(PreTrainedConfig):
    r"""
    Configuration of a [`DreamDraftModel`]: a small drafter that proposes tokens for one target
    vision-language model and is verified by it.

    Sizes are copied from the target's text model by [`DreamDraftModel.from_target`]; the
    `target_*` fields record which target the drafter was built for, so that a drafter used with
    another target fails with a clear error instead of drafting garbage.

    Args:
        vocab_size (`int`): Size of the target's text vocabulary (the drafter uses the target's
            own input embeddings and lm_head, so it must match exactly).
        hidden_size (`int`): Hidden size of the target's text model; the drafter runs at the same width.
        intermediate_size (`int`): MLP width of the draft blocks (the target's by default).
        num_attention_heads (`int`): Attention heads of the draft blocks.
        num_key_value_heads (`int`): Key/value heads of the draft blocks (grouped-query attention).
        head_dim (`int`): Dimension of one attention head.
        hidden_act (`str`): Activation of the draft MLPs.
        rms_norm_eps (`float`): Epsilon of the RMS norms.
        max_position_embeddings (`int`): Longest sequence the rotary embedding is sized for.
        rope_theta (`float`): Base of the rotary embedding of the draft self-attention (and of the
            cross-attention with `cross_attention_rope`).
        mrope_section (`list[int]`, *optional*): For a target with multimodal rotary positions
            (M-RoPE: Qwen2.5-VL, Qwen3-VL), how many rotary frequencies follow each position axis
            (temporal, height, width), copied from the target's text config; the drafter's rotary
            then takes the target's own 3-D position ids. `None`: 1-D rotary positions.
        mrope_interleaved (`bool`): With `mrope_section`: the axes' frequencies interleave
            (t, h, w, t, h, w, ...: Qwen3-VL) instead of following in consecutive chunks (Qwen2.5-VL).
        attention_bias (`bool`): Whether the draft attention projections have a bias.
        initializer_range (`float`): Std of the normal initialisation of draft weights.
        fusion (`str`): How target features enter the drafter. `"cross_attention"` is DREAM:
            initial decoder block -> gated cross-attention over the target's last-layer features
            -> final decoder block. `"concat"` is the EAGLE-style baseline: the token embedding
            and the target feature of the previous position are concatenated and projected, then
            go through the decoder blocks (same number of blocks, for a fair comparison).
            `"cross_attention_concat"` is both: DREAM's three blocks with the cross-attention, whose initial
            block takes EAGLE's input (the projected [token embedding; previous target feature]) instead of the
            embedding alone, so the newest feature is given and the cross-attention reads the rest of the context.
        cross_attention_rope (`bool`, defaults to `False`): With a cross-attention fusion: a rotary embedding
            on the cross-attention's queries and keys by memory slot (the query at position p, the feature of
            slot j), so their score depends on the offset p - j and the drafter can find the newest verified
            feature by position, not only by content. DREAM's code uses no position there (`False`).
        visual_keep_ratio (`float`): Fraction of visual tokens kept in the *drafter's* input
            sequence, chosen by the attention they receive in the target's last layer
            (DREAM keeps 75%). `1.0` disables compression. The target always sees every token.
        draft_vocab_size (`int`, *optional*): If set, the drafter predicts only this many of the
            target's tokens (the most frequent ones in its training data, EAGLE-3 style): its
            output layer is the matching rows of the target's lm_head, a large saving when the
            target's vocabulary is big (49k for SmolLM2, 262k for Gemma 3). The id map is saved
            with the drafter as the `draft_vocab` buffer.
        feature_layers (`list[int]`, *optional*): The target hidden states the drafter reads as its features, by
            index of the target's `hidden_states` output (0 = the input embeddings, `L` = the last layer, post-norm),
            concatenated and fused to `hidden_size` by a linear layer (EAGLE-3: low, middle and high layers,
            `[2, L // 2, L - 3]`; `feature_layers="eagle3"` in `DreamDraftModel.from_target` picks them). `None`
            (default): the last layer alone, no fusion (DREAM, EAGLE-1/2).
        target_model_type (`str`): `model_type` of the target (e.g. `"llava"`, `"gemma3"`).
        target_name_or_path (`str`): Hub id or path of the target, for model cards and checks.
        target_num_hidden_layers (`int`): Number of decoder layers of the target's text model.
        target_image_token_id (`int`): Image placeholder id of the target, if any.
        target_build (`str`, *optional*): The build of the target the drafter was trained for, when the target
            records one (the offline reference targets do: `"smolvlm-ref-v2+<weights hash>"`). Using the drafter
            with another build of the same model warns, naming both: the output stays exact, but the drafter
            learned another model's features and accepts less.
        entropy_candidate_layers (`list[int]`): Target layers among which the training signal
            for the first draft block is chosen per token by lowest attention entropy (DREAM's
            reference code: `1 .. int(0.4 * L) - 2`).
        static_feature_layer (`int`): If set, supervise the first draft block with this fixed
            target layer instead of the entropy-selected one (ablation).

    Decoding options (`num_draft_tokens`, `draft_schedule`, the tree sizes) are not part of the
    config: they are per-call generation settings, [`DreamDecodingOptions`], passed to
    `generate(..., assistant_model=drafter, num_draft_tokens=3)` or set as the drafter's defaults in
    `drafter.decoding_options`. A `config.json` saved before they moved out (with
    `num_draft_tokens` / `draft_schedule` keys) still loads: the drafter built from it checks the
    values and makes them its `decoding_options` (a one-time warning says so when they differ from
    the library defaults); they are not written back when the config is saved again. Setting one on a
    config (`config.draft_schedule = "auto"`, the old way) is an `AttributeError` saying where it went.
    """

    model_type = "dream_drafter"

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    mrope_section: list[int] | None = None
    mrope_interleaved: bool = False
    attention_bias: bool = False
    initializer_range: float = 0.02
    fusion: str = "cross_attention"
    cross_attention_rope: bool = False
    visual_keep_ratio: float = 0.75
    draft_vocab_size: int | None = None
    feature_layers: list[int] | None = None
    target_model_type: str | None = None
    target_name_or_path: str | None = None
    target_num_hidden_layers: int | None = None
    target_image_token_id: int | None = None
    target_build: str | None = None
    entropy_candidate_layers: list[int] | None = None
    static_feature_layer: int | None = None

    def __post_init__(self, **kwargs):
        # decoding options saved in the config by earlier releases: kept for the drafter, which checks
        # them and makes them its `decoding_options`; never serialised again
        legacy = {name: kwargs.pop(name) for name in DECODING_OPTION_NAMES if name in kwargs}
        object.__setattr__(self, "_legacy_decoding_options", legacy or None)
        _check_field_types(self)
        _warn_unknown_keys(kwargs)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"`fusion` must be one of {FUSION_MODES}, got {self.fusion!r}.")
        if self.cross_attention_rope and self.fusion not in CROSS_ATTENTION_FUSIONS:
            raise ValueError(f"`cross_attention_rope` needs a cross-attention fusion {CROSS_ATTENTION_FUSIONS}, got fusion={self.fusion!r}.")
        if not 0.0 < self.visual_keep_ratio <= 1.0:
            raise ValueError(f"`visual_keep_ratio` must be in (0, 1], got {self.visual_keep_ratio}.")
        if self.draft_vocab_size is not None and not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"`draft_vocab_size` must be in [1, vocab_size={self.vocab_size}], got {self.draft_vocab_size}.")
        if self.mrope_section is not None and 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(
                f"`mrope_section` {self.mrope_section} must split the rotary's head_dim / 2 = {self.head_dim // 2} "
                f"frequencies (its sum is {sum(self.mrope_section)})."
            )
        if self.feature_layers is not None:
            layers, most = list(self.feature_layers), self.target_num_hidden_layers
            if len(layers) < 2 or len(set(layers)) != len(layers) or min(layers) < 0 or (most is not None and max(layers) > most):
                raise ValueError(
                    f"`feature_layers` must be at least two distinct target hidden-state indices in [0, "
                    f"{most if most is not None else 'L'}] (None: the last layer alone), got {self.feature_layers!r}."
                )
        if self.entropy_candidate_layers is None and self.target_num_hidden_layers:
            self.entropy_candidate_layers = default_entropy_candidate_layers(self.target_num_hidden_layers)
        super().__post_init__(**kwargs)

    def __setattr__(self, name, value):
        if name in _DECODING_OPTION_NAMES:
            raise AttributeError(
                f"`{name}` is a decoding option, no longer a DreamConfig field: pass it per call "
                f"(`target.generate(..., assistant_model=drafter, {name}=...)`) or set the drafter's default with "
                f"`drafter.decoding_options = drafter.decoding_options.updated({name}=...)`."
            )
        super().__setattr__(name, value)

    def to_dict(self):
        output = super().to_dict()
        output.pop("_legacy_decoding_options", None)
        return output

    @property
    def legacy_decoding_options(self) -> dict | None:
        """Decoding options found in this config's source (a `config.json` of an earlier release), or None."""
        return self.__dict__.get("_legacy_decoding_options")


_DECODING_OPTION_NAMES = frozenset(DECODING_OPTION_NAMES)


# Keys a saved config may carry besides DreamConfig's fields: transformers' own bookkeeping.
_BOOKKEEPING_KEYS = {
    "model_type", "auto_map", "torch_dtype", "name_or_path", "_name_or_path", "_commit_hash", "output_attentions",
    "attn_implementation", "experts_implementation", "per_layer_config", "_attn_implementation_internal",
    "_experts_implementation_internal", "num_labels",
}
_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "list[int]": list, "None": type(None)}


def _check_field_types(config: DreamConfig) -> None:
    """A wrong-typed value (`num_draft_tokens: "5"` in config.json) is named here, not as a comparison error later."""
    for name, annotation in DreamConfig.__annotations__.items():
        options = [part.strip() for part in str(annotation).split("|")]
        if any(option not in _TYPES for option in options):
            continue
        value = getattr(config, name)
        allowed = tuple(t for option in options for t in (_TYPES[option] if isinstance(_TYPES[option], tuple) else (_TYPES[option],)))
        wrong_bool = isinstance(value, bool) and "bool" not in options
        if wrong_bool or not isinstance(value, allowed):
            raise TypeError(
                f"DreamConfig `{name}` must be {' or '.join(options)}, got {value!r} ({type(value).__name__}); "
                "fix the value in config.json (numbers unquoted, true/false for flags)."
            )
        if "list[int]" in options and isinstance(value, list) and not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise TypeError(f"DreamConfig `{name}` must be a list of ints, got {value!r}.")


def _warn_unknown_keys(kwargs: dict) -> None:
    """Keys DreamConfig does not know are kept (as transformers does) but named: a typo would otherwise be ignored."""
    from transformers import GenerationConfig

    unknown = sorted(set(kwargs) - _BOOKKEEPING_KEYS - set(GenerationConfig._get_default_generation_params()))
    if not unknown:
        return
    fields = [*DreamConfig.__annotations__, *DECODING_OPTION_NAMES]  # an old folder's mistyped decoding option too
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, fields, n=1)
        hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    warnings.warn(
        f"DreamConfig ignores unknown key(s) {', '.join(hints)}: they have no effect on the drafter. "
        "Fix or remove them in config.json.",
        UserWarning,
        stacklevel=3,
    )


def default_entropy_candidate_layers(num_layers: int) -> list[int]:
    """Candidate layers of the reference code, `1 .. int(0.4 * L) - 2`, never empty."""
    upper = int(0.4 * num_layers) - 2
    return list(range(1, max(upper, 1) + 1))
