"""The one place that touches transformers' private generation dispatch.

transformers has no public registry for candidate generators: `_assisted_decoding` asks
`GenerationMixin._get_candidate_generator` for one, through a fixed if/elif chain. We wrap that
method (and `_validate_generation_mode`, for errors before any work) so that a
[`DreamDraftModel`] passed as `assistant_model` gets a [`DreamCandidateGenerator`]; every other
assistant goes through the original code untouched. Both methods are private, which is why
`pyproject.toml` pins the transformers release line that CI tests.

transformers' assisted loop handles one sequence only: for a batch of more than one prompt the
`generate` wrapper routes a DREAM `assistant_model` to the public `custom_generate` path with
[`batched_generate`] instead.
"""

from __future__ import annotations

import functools

from transformers.generation import GenerationMixin
from transformers.generation.configuration_utils import GenerationMode

from .candidate_generator import DreamCandidateGenerator
from .validation import check_dream_call

_ORIGINALS: dict[str, object] = {}


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
        return DreamCandidateGenerator(self, assistant_model, input_ids, generation_config, logits_processor)
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


def _generate(original):
    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        from .batched import batched_generate
        from .tree import tree_generate

        drafter = kwargs.get("assistant_model")
        if _is_dream_drafter(drafter):
            inputs = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids", kwargs.get("inputs_embeds")))
            if inputs is not None and inputs.shape[0] > 1:
                # transformers' assisted loop raises for batches: run our batched loop instead
                # (`assistant_model` must go, or generate() would resolve to assisted decoding)
                kwargs.pop("assistant_model")
                kwargs["custom_generate"] = batched_generate
                kwargs["drafter"] = drafter
        # transformers does not hand `streamer` to a custom_generate callable
        streamer_names = {tree_generate: "tree_streamer", batched_generate: "batched_streamer"}
        name = streamer_names.get(kwargs.get("custom_generate"))
        if name is not None and kwargs.get("streamer") is not None:
            kwargs[name] = kwargs.pop("streamer")
        return original(self, *args, **kwargs)

    generate.__hf_dream_wrapped__ = True
    return generate


def install() -> None:
    """Install the wrappers once (idempotent)."""
    if _ORIGINALS:
        return
    _ORIGINALS["_get_candidate_generator"] = GenerationMixin._get_candidate_generator
    _ORIGINALS["_validate_generation_mode"] = GenerationMixin._validate_generation_mode
    _ORIGINALS["generate"] = GenerationMixin.generate
    GenerationMixin._get_candidate_generator = _get_candidate_generator
    GenerationMixin._validate_generation_mode = _validate_generation_mode
    GenerationMixin.generate = _generate(GenerationMixin.generate)


def uninstall() -> None:
    """Restore transformers' own methods."""
    for name, method in _ORIGINALS.items():
        setattr(GenerationMixin, name, method)
    _ORIGINALS.clear()
