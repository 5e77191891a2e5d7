"""hf-dream: DREAM speculative decoding for vision-language models, inside transformers' generate().

Importing the package registers the Dream classes with transformers' Auto classes and installs
the generate() hook, so that `target.generate(**inputs, assistant_model=drafter)` drafts with a
[`DreamDraftModel`].

Training is exported lazily, as trl does: `from hf_dream import DreamTrainer,
DreamTrainingArguments, prepare_dataset` imports `hf_dream.training` (and transformers' Trainer)
on first use only, so `import hf_dream` stays fast.
"""

import importlib
from typing import TYPE_CHECKING

from transformers import AutoConfig, AutoModel

from .configuration_dream import DreamConfig
from .generation import DreamCandidateGenerator, DreamDecodingOptions, batched_generate, install, tree_generate
from .modeling_dream import DreamDraftModel, DreamDraftOutput, DreamFeatureMemory
from .targets import TARGET_ADAPTERS, TargetAdapter, get_target_adapter, register_target_adapter, supported_families

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from .training.data import prepare_dataset
    from .training.trainer import DreamTrainer, DreamTrainingArguments

__version__ = "0.1.0.dev0"

# name -> defining module, imported on first attribute access (PEP 562)
_LAZY_EXPORTS = {
    "DreamTrainer": ".training.trainer",
    "DreamTrainingArguments": ".training.trainer",
    "prepare_dataset": ".training.data",
}


def __getattr__(name: str):
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))


AutoConfig.register(DreamConfig.model_type, DreamConfig, exist_ok=True)
AutoModel.register(DreamConfig, DreamDraftModel, exist_ok=True)
install()

__all__ = [
    "DreamConfig",
    "DreamDraftModel",
    "DreamDraftOutput",
    "DreamFeatureMemory",
    "DreamCandidateGenerator",
    "DreamDecodingOptions",
    "TargetAdapter",
    "TARGET_ADAPTERS",
    "get_target_adapter",
    "register_target_adapter",
    "supported_families",
    "tree_generate",
    "batched_generate",
    "DreamTrainer",
    "DreamTrainingArguments",
    "prepare_dataset",
]
