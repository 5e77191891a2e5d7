"""hf-dream: DREAM speculative decoding for vision-language models, inside transformers' generate().

Importing the package registers the Dream classes with transformers' Auto classes and installs
the generate() hook, so that `target.generate(**inputs, assistant_model=drafter)` drafts with a
[`DreamDraftModel`].
"""

from transformers import AutoConfig, AutoModel

from .configuration_dream import DreamConfig
from .generation import DreamCandidateGenerator, batched_generate, install, tree_generate
from .modeling_dream import DreamDraftModel, DreamDraftOutput, DreamFeatureMemory
from .targets import TARGET_ADAPTERS, TargetAdapter, get_target_adapter, register_target_adapter, supported_families

__version__ = "0.1.0.dev0"

AutoConfig.register(DreamConfig.model_type, DreamConfig, exist_ok=True)
AutoModel.register(DreamConfig, DreamDraftModel, exist_ok=True)
install()

__all__ = [
    "DreamConfig",
    "DreamDraftModel",
    "DreamDraftOutput",
    "DreamFeatureMemory",
    "DreamCandidateGenerator",
    "TargetAdapter",
    "TARGET_ADAPTERS",
    "get_target_adapter",
    "register_target_adapter",
    "supported_families",
    "tree_generate",
    "batched_generate",
]
