"""The one place that touches transformers' private generation dispatch.

transformers has no public registry for candidate generators: `_assisted_decoding` asks
`GenerationMixin._get_candidate_generator` for one, through a fixed if/elif chain. We wrap that
method (and `_validate_generation_mode`, for errors before any work) so that a
[`DreamDraftModel`] passed as `assistant_model` gets a [`DreamCandidateGenerator`]; every other
assistant goes through the original code untouched. `_assisted_decoding` itself is wrapped for a
DREAM drafter only, to hand the call's stopping criteria to the candidate generator (it drafts
up to the first token at which one fires) and to close the generator however the call ends (no
hook stays on the target after a failed prefill); the per-call record lives in a context
variable, so concurrent calls in other threads never see it. `_extract_generation_mode_kwargs`
is wrapped to keep `tokenizer` (needed for `stop_strings`) for our `custom_generate` loops,
whose own arguments replace the standard ones there. The `generate` wrapper also takes this call's DREAM decoding
options out of its keywords (`num_draft_tokens=3`, `tree_depth=4`, `decoding_options=...`; see
[`DreamDecodingOptions`]), so that transformers never mistakes them for model inputs, and refuses
a keyword that looks like a mistyped one. These methods are private, which is why
`pyproject.toml` pins the transformers release line that CI tests.

transformers' assisted loop handles one sequence only: for a batch of more than one prompt the
`generate` wrapper routes a DREAM `assistant_model` to the public `custom_generate` path with
[`batched_generate`] instead.
"""

from __future__ import annotations

import contextvars
import functools
import inspect

import torch
from transformers.generation import GenerationMixin
from transformers.generation.configuration_utils import GenerationMode

from .batched import batched_generate
from .candidate_generator import DreamCandidateGenerator
from .options import CALL_INPUTS, DreamDecodingOptions, pop_call_options
from .tree import tree_generate
from .validation import check_dream_call

_ORIGINALS: dict[str, object] = {}

# Our `custom_generate` loops and the keyword each one takes the call's streamer under (transformers
# does not hand `streamer` to a custom_generate callable).
DREAM_LOOP_STREAMERS = {tree_generate: "tree_streamer", batched_generate: "batched_streamer"}
DREAM_LOOPS = tuple(DREAM_LOOP_STREAMERS)

# The assisted call (`_assisted_decoding` with a DREAM drafter) running in this context: its
# stopping criteria and, once created, its candidate generator.
_ASSISTED_CALL: contextvars.ContextVar[dict | None] = contextvars.ContextVar("hf_dream_assisted_call", default=None)
# The decoding options of the `generate(..., assistant_model=drafter, num_draft_tokens=...)` call
# running in this context, resolved (and popped from its keywords) by the `generate` wrapper.
_CALL_OPTIONS: contextvars.ContextVar[DreamDecodingOptions | None] = contextvars.ContextVar("hf_dream_call_options", default=None)


def _is_dream_drafter(model) -> bool:
    from ..modeling_dream import DreamDraftModel

    return isinstance(model, DreamDraftModel)


# Modes a DREAM drafter runs under: assisted generation (batch 1, `assistant_model=`) and the
# greedy / sampling modes that `custom_generate` loops (`drafter=`) are called under.
DREAM_GENERATION_MODES = (GenerationMode.ASSISTED_GENERATION, GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)


def validate_dream_generation(target, drafter, generation_mode, generation_config) -> None:
    """Errors for every setting DREAM decoding cannot honour, raised before any model work."""
    if generation_mode not in DREAM_GENERATION_MODES:
        raise ValueError(
            f"A DREAM drafter supports greedy decoding and sampling (num_beams=1), but this call resolves to "
            f"'{generation_mode}'. Remove `assistant_model` or set num_beams=1 and no constraints."
        )
    check_dream_call(target, drafter, generation_config, usage="`target.generate(..., assistant_model=drafter)`")


def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
    # `assistant_model` on the assisted path; `drafter` on the custom_generate paths (batched, tree)
    drafter = generation_mode_kwargs.get("assistant_model") or generation_mode_kwargs.get("drafter")
    if _is_dream_drafter(drafter):
        validate_dream_generation(self, drafter, generation_mode, generation_config)
    return _ORIGINALS["_validate_generation_mode"](self, generation_mode, generation_config, generation_mode_kwargs)


def _get_candidate_generator(self, generation_config, input_ids, inputs_tensor, logits_processor, model_kwargs, assistant_model=None, **kwargs):
    if _is_dream_drafter(assistant_model):
        call = _ASSISTED_CALL.get()
        generator = DreamCandidateGenerator(
            self, assistant_model, input_ids, generation_config, logits_processor,
            stopping_criteria=None if call is None else call["stopping_criteria"], model_kwargs=model_kwargs,
            options=_CALL_OPTIONS.get(),
        )
        if call is not None:
            call["generator"] = generator
        return generator
    return _ORIGINALS["_get_candidate_generator"](
        self,
        generation_config=generation_config,
        input_ids=input_ids,
        inputs_tensor=inputs_tensor,
        logits_processor=logits_processor,
        model_kwargs=model_kwargs,
        assistant_model=assistant_model,
        **kwargs,
    )


def _assisted_decoding(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def assisted_decoding(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        if not _is_dream_drafter(bound.arguments.get("assistant_model")):
            return original(self, *args, **kwargs)
        call = {"stopping_criteria": bound.arguments.get("stopping_criteria"), "generator": None}
        token = _ASSISTED_CALL.set(call)
        try:
            return original(self, *args, **kwargs)
        finally:
            _ASSISTED_CALL.reset(token)
            if call["generator"] is not None:
                call["generator"].close()

    return assisted_decoding


def _extract_generation_mode_kwargs(self, custom_generate, kwargs, *args, **more):
    tokenizer = kwargs.get("tokenizer") if custom_generate in DREAM_LOOPS else None
    mode_kwargs = _ORIGINALS["_extract_generation_mode_kwargs"](self, custom_generate, kwargs, *args, **more)
    if tokenizer is not None:  # transformers builds the stop-string criterion from it
        mode_kwargs["tokenizer"] = tokenizer
    return mode_kwargs


def _generate(original):
    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        drafter = kwargs.get("assistant_model")
        custom = kwargs.get("custom_generate") in DREAM_LOOPS
        if custom and _is_dream_drafter(kwargs.get("drafter")):
            drafter = kwargs["drafter"]
        if not _is_dream_drafter(drafter):
            return _plain_or_custom(original, self, args, kwargs)
        # this call's decoding options (keywords such as num_draft_tokens=3 are not model inputs): a
        # mistyped one is an error here, before any work
        options = pop_call_options(drafter, kwargs)
        call_inputs = None
        if options.drafter_image == "blank":  # the drafter's blank-image pass needs the pixels, which generate() encodes away
            call_inputs = {key: value for key, value in kwargs.items() if torch.is_tensor(value)}
            if args and torch.is_tensor(args[0]):
                call_inputs["input_ids"] = args[0]
        inputs_token = CALL_INPUTS.set(call_inputs)
        try:
            return _dream_generate(original, self, drafter, custom, options, args, kwargs)
        finally:
            CALL_INPUTS.reset(inputs_token)

    generate.__hf_dream_wrapped__ = True
    return generate


def _dream_generate(original, self, drafter, custom: bool, options: DreamDecodingOptions, args, kwargs):
    """A generate() call with a DREAM drafter: batches to our batched loop, custom loops with their options,
    the rest through transformers' assisted loop with our candidate generator."""
    if not custom:
        inputs = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids", kwargs.get("inputs_embeds")))
        if inputs is not None and inputs.shape[0] > 1:
            # transformers' assisted loop raises for batches: run our batched loop instead
            # (`assistant_model` must go, or generate() would resolve to assisted decoding)
            kwargs.pop("assistant_model")
            kwargs["custom_generate"] = batched_generate
            kwargs["drafter"] = drafter
    if kwargs.get("custom_generate") in DREAM_LOOPS:
        kwargs["decoding_options"] = options
        return _plain_or_custom(original, self, args, kwargs)
    token = _CALL_OPTIONS.set(options)  # the assisted path: read by `_get_candidate_generator`
    try:
        return original(self, *args, **kwargs)
    finally:
        _CALL_OPTIONS.reset(token)


def _plain_or_custom(original, self, args, kwargs):
    name = DREAM_LOOP_STREAMERS.get(kwargs.get("custom_generate"))
    if name is not None and kwargs.get("streamer") is not None:
        kwargs[name] = kwargs.pop("streamer")
    return original(self, *args, **kwargs)


def install() -> None:
    """Install the wrappers once (idempotent)."""
    if _ORIGINALS:
        return
    _ORIGINALS["_get_candidate_generator"] = GenerationMixin._get_candidate_generator
    _ORIGINALS["_validate_generation_mode"] = GenerationMixin._validate_generation_mode
    _ORIGINALS["generate"] = GenerationMixin.generate
    _ORIGINALS["_assisted_decoding"] = GenerationMixin._assisted_decoding
    _ORIGINALS["_extract_generation_mode_kwargs"] = GenerationMixin._extract_generation_mode_kwargs
    GenerationMixin._get_candidate_generator = _get_candidate_generator
    GenerationMixin._validate_generation_mode = _validate_generation_mode
    GenerationMixin._assisted_decoding = _assisted_decoding(GenerationMixin._assisted_decoding)
    GenerationMixin._extract_generation_mode_kwargs = _extract_generation_mode_kwargs
    GenerationMixin.generate = _generate(GenerationMixin.generate)


def uninstall() -> None:
    """Restore transformers' own methods."""
    for name, method in _ORIGINALS.items():
        setattr(GenerationMixin, name, method)
    _ORIGINALS.clear()
