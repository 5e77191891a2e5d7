"""Distillation of DREAM drafters: data regeneration, losses, the Trainer."""

from .data import DreamDataCollator, collate_model_inputs, prepare_dataset, response_mask
from .losses import dream_losses, kl_target_to_draft, top1_agreement
from .teacher_cache import TeacherCache, TeacherCacheSettings
from .trainer import DreamTrainer, DreamTrainingArguments, measure_acceptance_length

__all__ = [
    "DreamDataCollator",
    "DreamTrainer",
    "DreamTrainingArguments",
    "TeacherCache",
    "TeacherCacheSettings",
    "collate_model_inputs",
    "dream_losses",
    "kl_target_to_draft",
    "measure_acceptance_length",
    "prepare_dataset",
    "response_mask",
    "top1_agreement",
]
