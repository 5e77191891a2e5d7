"""hf_dream.hub.sizing: a drafter's config and sizes from a target's configuration alone."""

from __future__ import annotations

from conftest import cached_target
from hub_helpers import TARGET_ID, make_drafter

from hf_dream import DreamDraftModel
from hf_dream.hub import drafter_parameter_count, dream_config_from_target_config


def test_config_from_target_config_equals_config_for_target(family):
    target = cached_target(family)
    from_model = DreamDraftModel.config_for_target(target, target_name_or_path=TARGET_ID)
    from_dict = dream_config_from_target_config(target.config.to_dict(), target_name_or_path=TARGET_ID)
    assert from_dict.to_dict() == from_model.to_dict()


def test_parameter_count_on_meta_equals_real_drafter():
    drafter = make_drafter()
    assert drafter_parameter_count(drafter.config) == sum(p.numel() for p in drafter.parameters())
