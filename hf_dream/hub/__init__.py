"""Drafters as Hugging Face Hub repositories.

A publishable drafter folder (one per Hub repository, e.g. `model_cards/<repo-name>/` or the
drafter saved by `hf-dream train`) holds:

- `config.json`: the [`DreamConfig`] (required),
- `README.md`: the model card written by [`render_card`] (required to push),
- `model.safetensors` (or shards + index): the drafter's own weights; a repository without them
  is a config-and-recipe repository and its card says so,
- `target_config.json`: the target's configuration the `DreamConfig` was built from, with its
  provenance (see [`dream_config_from_target_config`]),
- `train.yaml`: the `hf-dream train --config` file of the recipe,
- `training.json`: what a finished training run did (`command`, `data`, `steps`, `hardware`,
  `wall_time`, optionally `date`, `datasets`, `notes`): the card quotes it, never invents it,
- `*.py`: the drafter's code, written by [`export_remote_code`] for users without hf-dream.

[`push_to_hub`] checks such a folder (safetensors only, no target weights, weights that match the
config, a valid card) before anything is uploaded; `hf-dream push` and
`DreamDraftModel.push_to_hub` both go through it.

One module per job:

- `sizing`: a `DreamConfig` and parameter counts from a target's configuration alone,
- `estimates`: time and memory of the paper's recipe for a target, and that recipe's commands,
- `cards`: rendering and validating model cards,
- `checks`: what may be uploaded ([`check_folder`]),
- `push`: the upload itself,
- `remote_code`: the drafter's code for `trust_remote_code=True` users.
"""

from .cards import (
    BASE_TAGS,
    CARD_TEMPLATE,
    LIBRARY_NAME,
    NO_WEIGHTS_STATUS,
    PIPELINE_TAG,
    REQUIRED_CARD_KEYS,
    CardValidationError,
    benchmark_section,
    render_card,
    validate_card,
)
from .checks import (
    ALLOWED_NAMES,
    ALLOWED_SUFFIXES,
    NON_SAFETENSORS_SUFFIXES,
    SKIPPED_DIRS,
    HubFolderError,
    check_folder,
    tensor_shapes,
)
from .estimates import A100_80GB, PAPER_RECIPE, GPUSpec, planned_recipe, training_estimate
from .push import PushResult, push_drafter, push_to_hub
from .remote_code import REMOTE_CODE_MARKER, export_remote_code, remote_code_sources
from .sizing import (
    drafter_parameter_count,
    dream_config_from_target_config,
    expected_drafter_tensors,
    read_target_record,
    target_config_from_dict,
    target_parameter_count,
)

__all__ = [
    "A100_80GB",
    "ALLOWED_NAMES",
    "ALLOWED_SUFFIXES",
    "BASE_TAGS",
    "CARD_TEMPLATE",
    "LIBRARY_NAME",
    "NON_SAFETENSORS_SUFFIXES",
    "NO_WEIGHTS_STATUS",
    "PAPER_RECIPE",
    "PIPELINE_TAG",
    "REMOTE_CODE_MARKER",
    "REQUIRED_CARD_KEYS",
    "SKIPPED_DIRS",
    "CardValidationError",
    "GPUSpec",
    "HubFolderError",
    "PushResult",
    "benchmark_section",
    "check_folder",
    "dream_config_from_target_config",
    "drafter_parameter_count",
    "expected_drafter_tensors",
    "export_remote_code",
    "planned_recipe",
    "push_drafter",
    "push_to_hub",
    "read_target_record",
    "remote_code_sources",
    "render_card",
    "target_config_from_dict",
    "target_parameter_count",
    "tensor_shapes",
    "training_estimate",
    "validate_card",
]
