"""hf_dream.hub is a package of small modules, one per job, and every name `hf_dream.hub` offered before the split still imports."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import hf_dream.hub

# every public name of the single-module hf_dream/hub.py (before it became a package)
NAMES_BEFORE_THE_SPLIT = (
    "A100_80GB", "ALLOWED_NAMES", "ALLOWED_SUFFIXES", "BASE_TAGS", "CARD_TEMPLATE", "CardValidationError", "GPUSpec",
    "HubFolderError", "LIBRARY_NAME", "NON_SAFETENSORS_SUFFIXES", "NO_WEIGHTS_STATUS", "PAPER_RECIPE", "PIPELINE_TAG",
    "PushResult", "REMOTE_CODE_MARKER", "REQUIRED_CARD_KEYS", "SKIPPED_DIRS", "benchmark_section", "check_folder",
    "dream_config_from_target_config", "drafter_parameter_count", "expected_drafter_tensors", "export_remote_code",
    "planned_recipe", "push_to_hub", "read_target_record", "remote_code_sources", "render_card", "target_config_from_dict",
    "target_parameter_count", "training_estimate", "validate_card",
)
JOBS = {"sizing", "estimates", "cards", "checks", "push", "remote_code"}


def test_hub_is_a_package_of_small_modules_one_per_job():
    assert hasattr(hf_dream.hub, "__path__"), "hf_dream.hub should be a package"
    modules = {info.name for info in pkgutil.iter_modules(hf_dream.hub.__path__)}
    assert modules == JOBS
    for name in modules:
        lines = inspect.getsource(importlib.import_module(f"hf_dream.hub.{name}")).count("\n")
        assert lines <= 350, f"hf_dream/hub/{name}.py has {lines} lines: split it by job"


def test_every_name_of_the_old_module_still_imports_from_hf_dream_hub():
    missing = [name for name in NAMES_BEFORE_THE_SPLIT if not hasattr(hf_dream.hub, name)]
    assert not missing
    assert set(NAMES_BEFORE_THE_SPLIT) <= set(hf_dream.hub.__all__)
    for name in hf_dream.hub.__all__:
        assert hasattr(hf_dream.hub, name), name
    assert hf_dream.hub.CARD_TEMPLATE.read_text().startswith("---")  # package data, read through importlib.resources
