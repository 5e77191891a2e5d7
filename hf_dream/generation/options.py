"""Decoding options of DREAM: how much to draft per round, per call.

These are generation settings, not architecture, so they live here and not in [`DreamConfig`]
(as transformers keeps `num_assistant_tokens` in an assistant's `generation_config`, not in its
model config). Every call resolves them in this order:

1. the library defaults below ([`DreamDecodingOptions`] with no arguments);
2. the drafter's own defaults, `drafter.decoding_options` (set it to change every later call;
   a drafter folder saved before these options moved out of `config.json` brings its saved values
   here, see [`DreamConfig`]);
3. the call's keyword arguments: `target.generate(..., assistant_model=drafter, num_draft_tokens=3)`,
   or a whole `decoding_options=DreamDecodingOptions(...)`, which replaces the drafter's defaults
   (keyword arguments still override its fields).

An option name that is not one of the fields below (a typo) is an error naming it.
"""

from __future__ import annotations

import contextvars
import difflib
from dataclasses import asdict, dataclass, fields, replace

from transformers.utils import logging

from ..configuration_dream import DRAFT_SCHEDULES

logger = logging.get_logger(__name__)

DRAFTER_IMAGES = ("real", "blank")  # what the drafter is shown of the prompt's images (see `drafter_image`)

# the model-input tensors a DREAM generate() call was given, before transformers encodes its images (set by the
# generate hook for `drafter_image="blank"`, whose second prompt pass needs the pixels)
CALL_INPUTS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("hf_dream_call_inputs", default=None)


@dataclass(frozen=True)
class DreamDecodingOptions:
    r"""
    Per-call decoding options of DREAM speculative decoding, with their defaults.

    Args:
        num_draft_tokens (`int`, defaults to 5): tokens drafted per round in chain drafting (the
            counterpart of an assistant's `generation_config.num_assistant_tokens`); the first length
            of the `"heuristic"` schedule.
        draft_schedule (`str`, defaults to `"constant"`): `"constant"` drafts `num_draft_tokens` every
            round; `"heuristic"` adapts it during a call as transformers' assistants do (+2 after a
            fully accepted draft, -1 otherwise, never below 1); `"auto"` times verification passes and a
            drafter step on this machine once, estimates the acceptance rate from the rounds seen
            (remembered across calls) and drafts the length with the best expected tokens per second,
            1..8 (`hf_dream.generation.cost_model`; batch-1 chain decoding; batches draft
            `num_draft_tokens`).
        tree_top_k (`int`, defaults to 4): tree decoding: children expanded per node, and frontier
            nodes expanded per level.
        tree_depth (`int`, defaults to 5): tree decoding: longest drafted path (tokens after the last one).
        tree_total_tokens (`int` or `"auto"`, defaults to 16): tree decoding: drafted nodes verified per
            target pass (the root comes on top); `"auto"` sizes the tree from measured verification
            costs and the acceptance observed (see [`tree_generate`]).
        drafter_image (`str`, defaults to `"real"`): a measurement switch. `"blank"` gives the drafter a
            blank picture: its view of the prompt (input embeddings, the target features in its memory, the
            ranking of visual tokens) comes from a second target pass over the same prompt with every image
            blanked (a uniform light grey, `TargetAdapter.blank_pixel_value`), while the target decodes and verifies with
            the real image. The output stays the target's; only acceptance changes, which measures how much
            the drafter uses the image (`hf-dream bench --drafter-image blank`).
    """

    num_draft_tokens: int = 5
    draft_schedule: str = "constant"
    tree_top_k: int = 4
    tree_depth: int = 5
    tree_total_tokens: int | str = 16
    drafter_image: str = "real"

    def __post_init__(self):
        for name in ("num_draft_tokens", "tree_top_k", "tree_depth", "tree_total_tokens"):
            value = getattr(self, name)
            if name == "tree_total_tokens" and value == "auto":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                allowed = "an int >= 1" + (' or "auto"' if name == "tree_total_tokens" else "")
                raise ValueError(f"DREAM decoding option `{name}` must be {allowed}, got {value!r}.")
        if self.draft_schedule not in DRAFT_SCHEDULES:
            raise ValueError(f"DREAM decoding option `draft_schedule` must be one of {DRAFT_SCHEDULES}, got {self.draft_schedule!r}.")
        if self.drafter_image not in DRAFTER_IMAGES:
            raise ValueError(f"DREAM decoding option `drafter_image` must be one of {DRAFTER_IMAGES}, got {self.drafter_image!r}.")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(f.name for f in fields(cls))

    def updated(self, **overrides) -> DreamDecodingOptions:
        """A copy with `overrides` applied (`None` values are skipped); an unknown name is a `ValueError` naming it."""
        check_option_names(overrides)
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        """`{option name: value}`, every option."""
        return asdict(self)


def check_option_names(names, where: str = "") -> None:
    """`ValueError` naming every entry of `names` that is not a DREAM decoding option, with the closest option
    (`where`: the call they came with)."""
    known = DreamDecodingOptions.names()
    unknown = [name for name in names if name not in known]
    if unknown:
        parts = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            parts.append(f"`{name}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
        raise ValueError(
            f"Unknown DREAM decoding option{'s' if len(unknown) > 1 else ''} {', '.join(parts)}{where}. "
            f"The DREAM decoding options are: {', '.join(known)}."
        )


def looks_like_option(name: str) -> bool:
    """Whether a leftover `generate()` keyword is probably a mistyped decoding option (no model input is
    named like one)."""
    if name.startswith(("tree_", "draft_", "num_draft")):
        return True
    return bool(difflib.get_close_matches(name, DreamDecodingOptions.names(), n=1, cutoff=0.8))


def pop_call_options(drafter, kwargs: dict) -> DreamDecodingOptions:
    """This call's options: `kwargs["decoding_options"]` or else `drafter.decoding_options`, with the
    option keywords in `kwargs` applied on top (all popped from `kwargs`). Keywords that look like mistyped options are a
    `ValueError` naming them, before any work."""
    given = kwargs.pop("decoding_options", None)
    overrides = {name: kwargs.pop(name) for name in DreamDecodingOptions.names() if name in kwargs}
    suspicious = [name for name in kwargs if looks_like_option(name)]
    check_option_names(suspicious, where=" in this generate() call with a DREAM drafter")
    return resolve_options(drafter, given, **overrides)


def resolve_options(drafter, decoding_options: DreamDecodingOptions | None = None, **overrides) -> DreamDecodingOptions:
    """`decoding_options` (default: `drafter.decoding_options`) with the non-None `overrides` applied."""
    if decoding_options is not None and not isinstance(decoding_options, DreamDecodingOptions):
        raise TypeError(f"`decoding_options` must be a DreamDecodingOptions, got {type(decoding_options).__name__}.")
    return (drafter_options(drafter) if decoding_options is None else decoding_options).updated(**overrides)


def drafter_options(drafter) -> DreamDecodingOptions:
    """The drafter's default options (`drafter.decoding_options`), checked."""
    options = getattr(drafter, "decoding_options", None)
    if options is None:
        return DreamDecodingOptions()
    if not isinstance(options, DreamDecodingOptions):
        raise TypeError(f"`drafter.decoding_options` must be a DreamDecodingOptions, got {type(options).__name__}.")
    return options


def options_from_config(config) -> DreamDecodingOptions:
    """A drafter's default options: the library defaults, or the values an earlier release saved in
    its `config.json` (checked here; a one-time warning when they differ from the defaults, since
    saving the drafter again no longer writes them)."""
    legacy = getattr(config, "legacy_decoding_options", None)
    if not legacy:
        return DreamDecodingOptions()
    check_option_names(legacy)
    options = DreamDecodingOptions(**legacy)
    changed = {name: value for name, value in legacy.items() if value != getattr(DreamDecodingOptions(), name)}
    if changed:
        logger.warning_once(
            f"This drafter's config.json holds decoding options ({', '.join(f'{k}={v!r}' for k, v in changed.items())}), "
            "which are per-call generation settings now: they become this drafter's defaults "
            "(`drafter.decoding_options`), but are not saved with it again. Pass them to "
            "`generate(..., assistant_model=drafter, ...)` instead."
        )
    return options
