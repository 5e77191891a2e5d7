"""One vision-training loop for every reference target, on transformers' `Trainer`.

The text model stays frozen (its weights run in bf16 under autocast; the exact float32 weights are put
back afterwards). The vision encoder and connector learn so that the VLM, shown a scene's *picture* and
an instruction, gives the response its text model wrote for the scene's *description*
(`instruction_data.py`), plus easy-VQA questions with their one-word answers so short answers stay
right, plus alignment captions of fresh scenes (the picture -> the scene's description, LLaVA's stage-1
role: in a response only a few words are about the picture, in a caption nearly all are). Loss: cross-entropy on the response tokens (the first `max_response_tokens` of each), plus an
auxiliary probe on the image tokens that must name the shapes and colours present and, per cell of
the 3x3 grid, what stands there: a direct signal for the vision tower (the answer loss reaches it only
through the frozen layers). The probe is dropped after training.

A target plugs in with a `VisionRecipe` (its module's `vision_recipe(model, processor)`): which modules
train, how a prompt is tokenized, which extra inputs its forward wants. `Trainer` brings the schedule,
bf16 autocast, the progress bar, checkpoints (only the trained tensors: a few MB each) and resuming.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments

from . import easy_vqa
from .common import RetrainStage
from .instruction_data import InstructionExample
from .scenes import COLORS, SHAPES, SIZES, TRAIN, scene_from_seed

PROBE_SHAPES = SHAPES  # easy-VQA's circle / rectangle / triangle are among them
PROBE_COLORS = tuple(COLORS)
GRID = 3  # PLACES is a 3x3 grid


@dataclasses.dataclass
class VisionTrainingArguments(TrainingArguments):
    """`TrainingArguments` for the reference targets' vision part; the defaults are the committed weights' recipe.

    Every `TrainingArguments` option works (`max_steps`, `learning_rate`, `save_steps`, ...); the fields
    below are the vision-specific ones.
    """

    output_dir: str | None = dataclasses.field(default=None, metadata={"help": "checkpoints (none: <cache>/reference/<target>-vision-training)"})
    max_steps: int = dataclasses.field(default=900, metadata={"help": "optimizer steps (default 900)"})
    per_device_train_batch_size: int = dataclasses.field(default=16, metadata={"help": "examples per step (default 16)"})
    learning_rate: float = dataclasses.field(default=1e-3, metadata={"help": "peak learning rate of the vision encoder (default 1e-3)"})
    weight_decay: float = dataclasses.field(default=0.01, metadata={"help": "AdamW weight decay (default 0.01)"})
    adam_beta2: float = dataclasses.field(default=0.98, metadata={"help": "AdamW beta2 (default 0.98)"})
    max_grad_norm: float = dataclasses.field(default=1.0, metadata={"help": "gradient clipping (default 1.0)"})
    warmup_steps: float = dataclasses.field(default=60, metadata={"help": "linear warmup steps (default 60)"})
    lr_scheduler_type: str = dataclasses.field(default="cosine", metadata={"help": "learning-rate schedule (default cosine)"})
    bf16: bool = dataclasses.field(default=True, metadata={"help": "bf16 autocast (default True: AMX on this CPU)"})
    logging_steps: float = dataclasses.field(default=10, metadata={"help": "log every N steps (default 10)"})
    save_steps: float = dataclasses.field(default=50, metadata={"help": "checkpoint every N steps (default 50)"})
    save_total_limit: int | None = dataclasses.field(default=2, metadata={"help": "checkpoints kept (default 2)"})
    report_to: str | list[str] | None = dataclasses.field(default="none", metadata={"help": "no trackers by default"})
    remove_unused_columns: bool = dataclasses.field(default=False, metadata={"help": "the collator builds the inputs"})
    dataloader_num_workers: int = dataclasses.field(default=0, metadata={"help": "data loading workers (default 0)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the data order and of the probe (default 0)"})

    max_response_tokens: int = dataclasses.field(default=40, metadata={"help": "train on the first N tokens of each response (default 40: most of the image's information is said early; the rest of a response follows from them)"})
    vqa_fraction: float = dataclasses.field(default=0.2, metadata={"help": "share of easy-VQA questions in the mix, drawn from all of easy-VQA's training questions (default 0.2)"})
    caption_fraction: float = dataclasses.field(default=0.25, metadata={"help": "share of alignment captions in the mix: a fresh training scene's picture, a caption prompt, and the scene's description as the answer, every word of which is about the picture (LLaVA's stage-1 captions; default 0.25)"})
    connector_lr_scale: float = dataclasses.field(default=2.0, metadata={"help": "connector learning rate = this x learning_rate (default 2.0)"})
    probe_weight: float = dataclasses.field(default=0.5, metadata={"help": "weight of the auxiliary shape/colour probe loss (default 0.5)"})
    shape_steps: int = dataclasses.field(default=0, metadata={"help": "stage 0, before stage 1: optimizer steps in which the vision tower alone learns the objects' shapes on freshly drawn training scenes (each object's mean last-layer patch feature -> its shape, and per patch the shape and colour under it): the part of a scene this tower learns last and only at a low learning rate; resumable in <output_dir>/shapes (default 0: no stage 0)"})
    shape_learning_rate: float = dataclasses.field(default=1e-4, metadata={"help": "stage 0: peak learning rate (default 1e-4: at 5e-4 and above this vision transformer stays at chance on shapes, `benchmarks/reference/smolvlm-ref-v2-attempt3/` section 4)"})
    object_shape_weight: float = dataclasses.field(default=0.0, metadata={"help": "stage 1: weight of stage 0's object-level shape loss at the last vision layer, kept beside the transcript so the shapes stay learned (default 0.0)"})
    transcript_vision_lr_scale: float = dataclasses.field(default=1.0, metadata={"help": "stage 1: the vision tower's learning rate = this x transcript_learning_rate; the connector keeps transcript_learning_rate (default 1.0)"})
    transcript_steps: int = dataclasses.field(default=0, metadata={"help": "stage 1, before the mixture: optimizer steps in which the vision tower + connector alone learn to make the image tokens spell the scene's transcript (`transcripts.TranscriptLayout`: the description at fixed offsets) on freshly drawn training scenes, with dense per-patch targets (which object, its shape, colour, size) at a middle layer; no text-model pass, so cheap; resumable in <output_dir>/transcript (default 0: no stage 1)"})
    transcript_batch_size: int = dataclasses.field(default=32, metadata={"help": "stage 1: scenes per step (default 32)"})
    transcript_learning_rate: float = dataclasses.field(default=1e-3, metadata={"help": "stage 1: peak learning rate (default 1e-3)"})
    transcript_fill_weight: float = dataclasses.field(default=0.2, metadata={"help": "stage 1: weight of the transcript's fill positions against its words' (default 0.2)"})
    dense_weight: float = dataclasses.field(default=1.0, metadata={"help": "stage 1: weight of the dense per-patch targets (default 1.0)"})
    init_weights: str | None = dataclasses.field(default=None, metadata={"help": "start every stage from the trained tensors of this file instead of the random init: a checkpoint of any stage (`checkpoint-N/model.safetensors`), a build's weights file (`build --retrain --weights`) or a vision tower alone (keys `vlm.model.vision_model.*`; the connector then starts fresh); a fresh schedule (default None)"})
    probe_scenes_per_step: int = dataclasses.field(default=16, metadata={"help": "extra freshly drawn training scenes per step that only the probe sees (vision tower + connector, no text model: cheap); they show the vision tower far more scenes than there are responses (default 16)"})

    def __post_init__(self):
        if self.bf16 and not torch.cuda.is_available():
            self.use_cpu = True  # bf16 autocast on the CPU (AMX) rather than an error asking for a GPU
        super().__post_init__()


@dataclasses.dataclass
class VisionRecipe:
    """What the shared loop needs to know about one reference target."""

    name: str
    vision: nn.Module  # trained
    connector: nn.Module  # trained; its output [images, image tokens, hidden] feeds the probe
    text_model: nn.Module  # frozen
    tokenize: Callable[[str, str | None, bool], tuple[list[int], list[int]]]  # (prompt, response text, ends) -> (prompt ids, response ids)
    pixels: Callable[[Any], torch.Tensor]  # PIL image -> the processor's pixel tensor of one image
    forward_inputs: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]  # (input_ids, stacked pixels) -> extra forward kwargs
    vqa_prompt: Callable[[str], str]
    pad_token_id: int
    text_ids: Callable[[str], list[int]] | None = None  # text -> the text model's token ids, no special tokens (stage 1's transcripts)
    untrained_keys: tuple[str, ...] = ()  # keys of the target's build weights file that no stage trains (e.g. added-token rows)


@dataclasses.dataclass
class VisionExample:
    """A tokenized training example: prompt ids (image block expanded), response ids, the image and probe labels."""

    prompt_ids: list[int]
    response_ids: list[int]
    image: tuple[str, int]  # ("scene", seed) or ("easy-vqa", image id)
    shapes: tuple[int, ...]
    colors: tuple[int, ...]
    cells: tuple[tuple[int, int], ...] | None  # per grid cell (shape, colour) indices, -1 = empty; None: unknown


def scene_probe_labels(scene) -> tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[int, int], ...]]:
    """(shape indices present, colour indices present, per grid cell (shape, colour) or (-1, -1) when empty)."""
    cells = [(-1, -1)] * (GRID * GRID)
    for obj in scene.objects:
        cells[obj.cell[1] * GRID + obj.cell[0]] = (PROBE_SHAPES.index(obj.shape), PROBE_COLORS.index(obj.color))
    attrs = scene.attributes()
    return tuple(PROBE_SHAPES.index(s) for s in attrs["shapes"]), tuple(PROBE_COLORS.index(c) for c in attrs["colors"]), tuple(cells)


# Caption prompts of the alignment captions (LLaVA's stage-1 role): a scene's own description is the answer.
# Worded unlike every instruction kind (`instructions.py`), so the instruction answers stay the text model's.
CAPTION_PROMPTS = (
    "Write the scene caption: the background, then each object's size, colour, shape and place.",
    "Scene caption (background; every object's size, colour, shape, place):",
)
CAPTION_SEED_OFFSET = 7_000_000  # caption scenes: `scenes.TRAIN` from this index on (responses: from 0; probe: 5,000,000)
MIXTURE_KINDS = ("response", "easy-vqa", "caption")


@dataclasses.dataclass(frozen=True)
class MixtureSlot:
    """One training example of the mixture: its kind and which response / easy-VQA question / caption scene."""

    kind: str  # one of MIXTURE_KINDS
    index: int


class VisionTrainingSet(torch.utils.data.Dataset):
    """The training mixture: the text model's responses, easy-VQA questions and alignment captions.

    Its length covers the whole run (`max_steps` x batch size, at least one pass over the responses), so
    the shares are exact: `vqa_fraction` of the slots are easy-VQA questions cycling through *all* of
    easy-VQA's training questions (plus SmolVLM-style paraphrases), `caption_fraction` are captions of
    fresh training scenes (a picture and a caption prompt; the answer is the scene's description, the
    very text the text model was shown), the rest are the responses, in a new order each pass. Slots
    are tokenized on access; images are drawn (or read) and processed on access.
    """

    def __init__(self, recipe: VisionRecipe, scene_examples: list[InstructionExample], args: VisionTrainingArguments):
        self.recipe, self.args = recipe, args
        self.responses: list[VisionExample] = []
        for example in scene_examples:
            if not example.response:
                continue
            prompt, response = recipe.tokenize(example.instruction, example.response, bool(example.finished))
            shapes, colors, cells = scene_probe_labels(scene_from_seed(example.seed))
            self.responses.append(VisionExample(prompt, response[: args.max_response_tokens], ("scene", example.seed), shapes, colors, cells))
        questions, self.vqa_paths = easy_vqa.load_split("train")
        self.questions = questions + easy_vqa.paraphrased_examples(questions, seed=args.seed)
        self.vqa_attributes = easy_vqa.image_attributes(self.questions)
        shares = {"easy-vqa": args.vqa_fraction, "caption": args.caption_fraction}
        if min(shares.values()) < 0 or sum(shares.values()) >= 1 or (not self.responses and sum(shares.values()) < 1):
            raise ValueError(f"vqa_fraction + caption_fraction must be in [0, 1) with responses to train on, got {shares}")
        response_share = 1 - sum(shares.values())
        per_run = max(0, args.max_steps) * args.per_device_train_batch_size * max(1, args.gradient_accumulation_steps)
        length = max(per_run, math.ceil(len(self.responses) / response_share))
        counts = {kind: int(round(length * share)) for kind, share in shares.items()}
        counts["response"] = length - sum(counts.values())
        rng = random.Random(args.seed)
        kinds = [kind for kind in MIXTURE_KINDS for _ in range(counts[kind])]
        rng.shuffle(kinds)
        orders = {"response": len(self.responses), "easy-vqa": len(self.questions)}
        taken = dict.fromkeys(MIXTURE_KINDS, 0)
        permutation: dict[str, list[int]] = {}
        self.slots: list[MixtureSlot] = []
        for kind in kinds:
            k = taken[kind]
            taken[kind] += 1
            if kind == "caption":
                self.slots.append(MixtureSlot(kind, k))
                continue
            size = orders[kind]
            if k % size == 0:  # a new pass: a new order
                permutation[kind] = rng.sample(range(size), size)
            self.slots.append(MixtureSlot(kind, permutation[kind][k % size]))
        self._answers: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.slots)

    def counts(self) -> dict[str, int]:
        """Slots per kind."""
        return {kind: sum(s.kind == kind for s in self.slots) for kind in MIXTURE_KINDS}

    def caption_scene(self, index: int):
        """The `index`-th caption scene (fresh training seeds, disjoint from the responses' and the probe's)."""
        return scene_from_seed(TRAIN.seed(CAPTION_SEED_OFFSET + self.args.seed * 1_000_000 + index))

    def example(self, index: int) -> VisionExample:
        """The tokenized example of slot `index`."""
        slot = self.slots[index]
        if slot.kind == "response":
            return self.responses[slot.index]
        if slot.kind == "caption":
            scene = self.caption_scene(slot.index)
            prompt, answer = self.recipe.tokenize(CAPTION_PROMPTS[slot.index % len(CAPTION_PROMPTS)], scene.description(), True)
            return VisionExample(prompt, answer, ("scene", scene.seed), *scene_probe_labels(scene))
        question = self.questions[slot.index]
        text = question.answer[:1].upper() + question.answer[1:]
        if text not in self._answers:
            self._answers[text] = self.recipe.tokenize("", text, True)[1]
        prompt, _ = self.recipe.tokenize(self.recipe.vqa_prompt(question.question), None, True)
        attrs = self.vqa_attributes.get(question.image_id, {})
        return VisionExample(
            prompt, self._answers[text], ("easy-vqa", question.image_id),
            (PROBE_SHAPES.index(attrs["shape"]),) if "shape" in attrs else (),
            (PROBE_COLORS.index(attrs["color"]),) if "color" in attrs else (),
            None,
        )

    def image(self, key: tuple[str, int]):
        """The PIL image of an example: a scene redrawn from its seed, or an easy-VQA file."""
        from PIL import Image

        kind, value = key
        return scene_from_seed(value).draw() if kind == "scene" else Image.open(self.vqa_paths[value]).convert("RGB")

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.example(index)
        return {"example": example, "pixels": self.recipe.pixels(self.image(example.image))}


def collate(recipe: VisionRecipe, items: list[dict[str, Any]], probe_scenes: list | None = None) -> dict[str, torch.Tensor]:
    """Right-padded input ids, mask and labels (-100 outside responses), stacked pixels, probe targets; `probe_scenes`
    (scenes only the probe sees) add `probe_pixel_values` and their rows after the batch's own in the probe targets."""
    examples = [item["example"] for item in items]
    length = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    input_ids = torch.full((len(examples), length), recipe.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, e in enumerate(examples):
        sequence = e.prompt_ids + e.response_ids
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        labels[row, len(e.prompt_ids) : len(sequence)] = torch.tensor(e.response_ids)
    probe_scenes = probe_scenes or []
    extra = [VisionExample([], [], ("scene", s.seed), *scene_probe_labels(s)) for s in probe_scenes]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "pixel_values": torch.stack([item["pixels"] for item in items]), **_probe_targets(examples + extra)}
    if probe_scenes:
        batch["probe_pixel_values"] = torch.stack([recipe.pixels(s.draw()) for s in probe_scenes])
    return batch


def _probe_targets(examples: list[VisionExample]) -> dict[str, torch.Tensor]:
    presence = torch.zeros(len(examples), len(PROBE_SHAPES) + len(PROBE_COLORS))
    presence_known = torch.zeros(len(examples), dtype=torch.bool)
    cells = torch.full((len(examples), GRID * GRID, 2), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        for s in e.shapes:
            presence[row, s] = 1
        for c in e.colors:
            presence[row, len(PROBE_SHAPES) + c] = 1
        presence_known[row] = e.cells is not None  # easy-VQA: what is absent is not always known
        if e.cells is not None:
            cell_labels = torch.tensor(e.cells)
            cell_labels[cell_labels < 0] = -1
            # empty cells: class "none" (the last index of each head)
            cell_labels[:, 0][cell_labels[:, 0] < 0] = len(PROBE_SHAPES)
            cell_labels[:, 1][cell_labels[:, 1] < 0] = len(PROBE_COLORS)
            cells[row] = cell_labels
    return {"probe_presence": presence, "probe_presence_known": presence_known, "probe_cells": cells}


class VisionCollator:
    """`collate` plus `probe_scenes_per_step` fresh training scenes per batch, drawn from seeds past the response
    examples' (`scenes.TRAIN`, from index 5,000,000 on), so the vision tower sees far more scenes than have responses."""

    PROBE_SEED_OFFSET = 5_000_000

    def __init__(self, recipe: VisionRecipe, probe_scenes_per_step: int, seed: int = 0):
        self.recipe, self.per_step, self.calls = recipe, probe_scenes_per_step, 0
        self.start = self.PROBE_SEED_OFFSET + seed * 1_000_000

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        first = self.start + self.calls * self.per_step
        self.calls += 1
        return collate(self.recipe, items, [scene_from_seed(TRAIN.seed(first + k)) for k in range(self.per_step)])


class VisionTrainingModel(nn.Module):
    """The VLM with a probe on its image tokens; `state_dict()` holds only what trains (vision, connector, probe)."""

    def __init__(self, vlm, recipe: VisionRecipe, seed: int = 0):
        super().__init__()
        self.vlm = vlm
        self.recipe = recipe
        hidden = vlm.config.get_text_config().hidden_size
        torch.manual_seed(seed)
        self.probe_presence = nn.Linear(hidden, len(PROBE_SHAPES) + len(PROBE_COLORS))
        self.probe_cell_shape = nn.Linear(hidden, len(PROBE_SHAPES) + 1)
        self.probe_cell_color = nn.Linear(hidden, len(PROBE_COLORS) + 1)
        self._features: list[torch.Tensor] = []
        recipe.connector.register_forward_hook(lambda module, inputs, output: self._features.append(output))
        for p in vlm.parameters():
            p.requires_grad_(False)
        for module in (recipe.vision, recipe.connector):
            for p in module.parameters():
                p.requires_grad_(True)

    def trainable_names(self) -> set[str]:
        """Names of the parameters that train (vision tower, connector, probe heads)."""
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def state_dict(self, *args, **kwargs):  # noqa: D102 - Trainer checkpoints: only the trained tensors
        full = super().state_dict(*args, **kwargs)
        keep = self.trainable_names()
        return {k: v for k, v in full.items() if k in keep}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: D102 - checkpoints hold the trained tensors only
        expected = self.trainable_names()
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if missing or unexpected:
            raise ValueError(f"the checkpoint does not fit this vision training: missing {missing[:5]}, unexpected {unexpected[:5]}")
        super().load_state_dict(state_dict, strict=False, assign=assign)
        return nn.modules.module._IncompatibleKeys([], [])

    def forward(self, input_ids, attention_mask, labels, pixel_values, probe_presence, probe_presence_known, probe_cells,
                probe_pixel_values=None):
        self._features.clear()
        extra = self.recipe.forward_inputs(input_ids, pixel_values)
        out = self.vlm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
        hidden = out.last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        where = targets != -100
        head = self.vlm.get_output_embeddings().weight
        logits = (hidden[where].to(head.dtype) @ head.T).float()
        answer_loss = F.cross_entropy(logits, targets[where])

        features = self._features[-1].float()  # [images, tokens, hidden]
        features = features.reshape(input_ids.shape[0], -1, features.shape[-1])
        if probe_pixel_values is not None:  # scenes only the probe sees: vision tower + connector alone
            flat = probe_pixel_values.reshape(-1, *probe_pixel_values.shape[-3:])
            extra = self.recipe.connector(self.recipe.vision(pixel_values=flat).last_hidden_state).float()
            features = torch.cat([features, extra.reshape(flat.shape[0], -1, extra.shape[-1])])
        presence_logits = self.probe_presence(features.mean(1))
        presence_loss = F.binary_cross_entropy_with_logits(presence_logits, probe_presence, reduction="none")
        # easy-VQA: only the named shape/colour is known to be present; absent ones count for scenes only
        weight = torch.where(probe_presence_known[:, None], torch.ones_like(presence_loss), probe_presence)
        probe_loss = (presence_loss * weight).sum() / weight.sum().clamp(min=1)
        side = int(math.isqrt(features.shape[1]))
        grid = features.transpose(1, 2).reshape(features.shape[0], -1, side, side)
        pooled = F.adaptive_avg_pool2d(grid, GRID).flatten(2).transpose(1, 2)  # [B, 9, hidden], raster order as PLACES
        if (probe_cells[..., 0] >= 0).any():
            probe_loss = probe_loss + F.cross_entropy(self.probe_cell_shape(pooled).flatten(0, 1), probe_cells[..., 0].flatten(), ignore_index=-100)
            probe_loss = probe_loss + F.cross_entropy(self.probe_cell_color(pooled).flatten(0, 1), probe_cells[..., 1].flatten(), ignore_index=-100)
        with torch.no_grad():
            self.last_metrics = {
                "answer_loss": answer_loss.item(),
                "token_accuracy": (logits.argmax(-1) == targets[where]).float().mean().item(),
                "probe_loss": probe_loss.item(),
            }
        return {"loss": answer_loss + self.probe_weight * probe_loss}


class VisionTrainer(Trainer):
    """`Trainer` with the connector at a higher learning rate and the answer / probe losses and token accuracy logged."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            wrapper = self.model
            connector = set(wrapper.recipe.connector.parameters())  # Parameters hash by identity
            groups: dict[tuple[bool, bool], list] = {}
            for p in wrapper.parameters():
                if p.requires_grad:
                    groups.setdefault((p in connector, p.dim() >= 2), []).append(p)
            lr = self.args.learning_rate
            self.optimizer = torch.optim.AdamW(
                [
                    {"params": params, "lr": lr * (self.args.connector_lr_scale if is_connector else 1.0), "weight_decay": self.args.weight_decay if decay else 0.0}
                    for (is_connector, decay), params in groups.items()
                ],
                betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon,
            )
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        metrics = getattr(model, "last_metrics", None)
        if metrics:
            self._metric_sums = getattr(self, "_metric_sums", {})
            for k, v in metrics.items():
                total, count = self._metric_sums.get(k, (0.0, 0))
                self._metric_sums[k] = (total + v, count + 1)
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        for k, (total, count) in getattr(self, "_metric_sums", {}).items():
            logs[k] = round(total / max(1, count), 4)
        self._metric_sums = {}
        super().log(logs, *args, **kwargs)


# --- stage 1: image tokens that spell the scene's transcript ----------------------------------
TRANSCRIPT_SEED_OFFSET = 8_000_000  # stage-1 scenes: `scenes.TRAIN` from this index on (disjoint from the other kinds')
TRANSCRIPT_EVAL_SEEDS = range(300_000, 300_128)  # `scenes.EVAL` indices of the held-out transcript check
DENSE_HEADS = {"object": 4 + 1, "shape": len(SHAPES) + 1, "color": len(COLORS) + 1, "size": len(SIZES) + 1}  # last class: background


def transcript_targets(recipe: VisionRecipe, layout, scene, patches: int) -> dict[str, torch.Tensor]:
    """Stage-0/1 targets of one scene: its transcript ids, each object's shape (-100 past the last object) and, per
    image patch (raster order), which object it shows and that object's shape / colour / size (the background class
    where no object covers it)."""
    owner = torch.tensor(scene.object_map(patches)).flatten()  # 0 = background, k + 1 = objects[k]
    attributes = {
        "object": list(range(len(scene.objects))),
        "shape": [SHAPES.index(o.shape) for o in scene.objects],
        "color": [list(COLORS).index(o.color) for o in scene.objects],
        "size": [list(SIZES).index(o.size) for o in scene.objects],
    }
    dense = {}
    for head, classes in DENSE_HEADS.items():
        table = torch.tensor([classes - 1, *attributes[head]])  # owner 0 -> background class
        dense[f"patch_{head}"] = table[owner]
    slots = DENSE_HEADS["object"] - 1
    object_shape = torch.full((slots,), -100, dtype=torch.long)
    object_shape[: len(scene.objects)] = torch.tensor(attributes["shape"][:slots])
    return {"transcript": torch.tensor(layout.ids(recipe.text_ids, scene)), "object_shape": object_shape, **dense}


class TranscriptSet(torch.utils.data.Dataset):
    """Stage 1's examples: freshly drawn training scenes (seeds from `TRANSCRIPT_SEED_OFFSET`), each its pixels
    and `transcript_targets`."""

    def __init__(self, recipe: VisionRecipe, layout, length: int, patches: int, seed: int = 0):
        self.recipe, self.layout, self.length, self.patches = recipe, layout, length, patches
        self.start = TRANSCRIPT_SEED_OFFSET + seed * 1_000_000

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int):
        """The `index`-th stage-1 scene."""
        return scene_from_seed(TRAIN.seed(self.start + index))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        scene = self.scene(index)
        return {"pixel_values": scene_pixels(self.recipe, scene), **transcript_targets(self.recipe, self.layout, scene, self.patches)}


def scene_pixels(recipe: VisionRecipe, scene) -> torch.Tensor:
    """The [3, size, size] pixels of a scene's picture (one image: no crops at the reference targets' sizes)."""
    pixels = recipe.pixels(scene.draw())
    return pixels.reshape(pixels.shape[-3:])


def dense_patch_loss(heads: nn.ModuleDict, hidden: torch.Tensor, patch_targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over `heads` of the per-patch cross-entropy against `patch_<name>` targets, background patches weighted 0.2."""
    weight = torch.where(patch_targets["patch_object"] == DENSE_HEADS["object"] - 1, 0.2, 1.0).flatten()
    return sum(
        (F.cross_entropy(head(hidden).flatten(0, 1), patch_targets[f"patch_{name}"].flatten(), reduction="none") * weight).sum() / weight.sum()
        for name, head in heads.items()
    )


def object_shape_logits(head: nn.Module, hidden: torch.Tensor, patch_object: torch.Tensor, object_shape: torch.Tensor):
    """(logits, targets) of each object's shape from the mean of its patches' features `hidden` [B, patches, H];
    objects with no patch (or past the last object) are left out."""
    slots = object_shape.shape[1]
    members = F.one_hot(patch_object, slots + 1)[..., :slots].to(hidden.dtype)  # background (class `slots`) dropped
    counts = members.sum(1)  # [B, slots]
    pooled = members.transpose(1, 2) @ hidden / counts.clamp(min=1)[..., None]
    present = (counts > 0) & (object_shape >= 0)
    return head(pooled[present]), object_shape[present]


class ShapeWarmupModel(nn.Module):
    """Stage 0: the vision tower alone learns the objects' shapes before anything has to spell them. Each object's
    mean last-layer patch feature -> its shape, plus per patch the shape and the colour of the object under it
    (background patches weighted 0.2). Shape is what needs several patches together; colour and place, which one
    patch carries, the later stages learn quickly anyway."""

    def __init__(self, recipe: VisionRecipe, seed: int = 0):
        super().__init__()
        self.recipe, self.vision = recipe, recipe.vision
        torch.manual_seed(seed)
        hidden = recipe.vision.config.hidden_size
        self.object_head = nn.Linear(hidden, len(SHAPES))
        self.patch_heads = nn.ModuleDict({head: nn.Linear(hidden, DENSE_HEADS[head]) for head in ("shape", "color")})
        for p in self.vision.parameters():
            p.requires_grad_(True)

    def forward(self, pixel_values, object_shape, patch_object, transcript=None, **patch_targets):
        hidden = self.vision(pixel_values=pixel_values).last_hidden_state.float()
        logits, targets = object_shape_logits(self.object_head, hidden, patch_object, object_shape)
        object_loss = F.cross_entropy(logits, targets)
        patch_loss = dense_patch_loss(self.patch_heads, hidden, {"patch_object": patch_object, **patch_targets})
        with torch.no_grad():
            self.last_metrics = {"object_loss": object_loss.item(), "patch_loss": patch_loss.item(),
                                 "shape_accuracy": (logits.argmax(-1) == targets).float().mean().item()}
        return {"loss": object_loss + patch_loss}


def shape_accuracy(model: ShapeWarmupModel, recipe: VisionRecipe, layout, batch_size: int = 32) -> float:
    """Held-out check of stage 0 on `TRANSCRIPT_EVAL_SEEDS` (`scenes.EVAL`): the share of objects whose shape the
    object head names."""
    from .scenes import EVAL

    patches = recipe.vision.config.image_size // recipe.vision.config.patch_size
    scenes = [scene_from_seed(EVAL.seed(k)) for k in TRANSCRIPT_EVAL_SEEDS]
    right = total = 0
    with torch.no_grad():
        for start in range(0, len(scenes), batch_size):
            chunk = scenes[start : start + batch_size]
            pixels = torch.stack([scene_pixels(recipe, s) for s in chunk])
            targets = [transcript_targets(recipe, layout, s, patches) for s in chunk]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hidden = model.vision(pixel_values=pixels).last_hidden_state.float()
            logits, shapes = object_shape_logits(model.object_head, hidden, torch.stack([t["patch_object"] for t in targets]),
                                                 torch.stack([t["object_shape"] for t in targets]))
            right += int((logits.argmax(-1) == shapes).sum())
            total += len(shapes)
    return round(right / max(1, total), 4)


class TranscriptModel(nn.Module):
    """Vision tower + connector (+ dense heads at the middle layer) trained to make each image token the text
    model's embedding of its transcript token: cross-entropy over the transcripts' vocabulary (tied to the
    embeddings) plus the squared distance to the embedding, then the dense per-patch cross-entropies and, with
    `object_shape_weight`, stage 0's object-level shape loss at the last layer (its head carried over from stage 0
    when given)."""

    def __init__(self, recipe: VisionRecipe, embeddings: torch.Tensor, vocabulary: list[int], fill_id: int,
                 fill_weight: float = 0.2, dense_weight: float = 1.0, seed: int = 0, object_shape_weight: float = 0.0,
                 object_head: nn.Module | None = None):
        super().__init__()
        self.recipe, self.vision, self.connector = recipe, recipe.vision, recipe.connector
        self.fill_weight, self.dense_weight, self.object_shape_weight = fill_weight, dense_weight, object_shape_weight
        embeddings = embeddings.detach().float()
        self.register_buffer("scale", embeddings.std(), persistent=False)
        self.register_buffer("vocabulary_embeddings", embeddings[torch.tensor(vocabulary)], persistent=False)
        self.register_buffer("vocabulary_ids", torch.tensor(vocabulary), persistent=False)
        lookup = torch.full((embeddings.shape[0],), -100, dtype=torch.long)
        lookup[torch.tensor(vocabulary)] = torch.arange(len(vocabulary))
        self.register_buffer("lookup", lookup, persistent=False)
        self.fill_index = int(lookup[fill_id])
        self.middle_layer = max(1, recipe.vision.config.num_hidden_layers // 2)
        torch.manual_seed(seed)
        hidden = recipe.vision.config.hidden_size
        self.dense_heads = nn.ModuleDict({head: nn.Linear(hidden, classes) for head, classes in DENSE_HEADS.items()})
        self.object_head = object_head if object_head is not None else nn.Linear(hidden, len(SHAPES))
        for module in (self.vision, self.connector):
            for p in module.parameters():
                p.requires_grad_(True)

    def image_tokens(self, pixel_values: torch.Tensor, with_middle: bool = False):
        """The connector's image tokens (float) and, `with_middle`, the vision tower's middle- and last-layer hidden states."""
        out = self.vision(pixel_values=pixel_values, output_hidden_states=with_middle)
        tokens = self.connector(out.last_hidden_state).float()
        return (tokens, out.hidden_states[self.middle_layer], out.last_hidden_state) if with_middle else tokens

    def nearest(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index (in the transcript vocabulary) of the nearest embedding by cosine, per image token."""
        return (F.normalize(tokens, dim=-1) @ F.normalize(self.vocabulary_embeddings, dim=-1).T).argmax(-1)

    def forward(self, pixel_values, transcript, object_shape=None, **patch_targets):
        tokens, middle, last = self.image_tokens(pixel_values, with_middle=True)
        target = self.lookup[transcript]
        weight = torch.where(target == self.fill_index, self.fill_weight, 1.0) * (target >= 0)
        logits = tokens @ self.vocabulary_embeddings.T / (self.scale**2 * tokens.shape[-1]).sqrt() * 4
        token_loss = F.cross_entropy(logits.flatten(0, 1), target.flatten().clamp(min=0), reduction="none")
        token_loss = (token_loss * weight.flatten()).sum() / weight.sum()
        distance = ((tokens - self.vocabulary_embeddings[target.clamp(min=0)]) ** 2).mean(-1) / self.scale**2
        distance = (distance * weight).sum() / weight.sum()
        dense_loss = dense_patch_loss(self.dense_heads, middle.float(), patch_targets)
        loss = token_loss + distance + self.dense_weight * dense_loss
        if self.object_shape_weight and object_shape is not None:
            logits, targets = object_shape_logits(self.object_head, last.float(), patch_targets["patch_object"], object_shape)
            loss = loss + self.object_shape_weight * F.cross_entropy(logits, targets)
        with torch.no_grad():
            words = (target != self.fill_index) & (target >= 0)
            self.last_metrics = {
                "token_loss": token_loss.item(),
                "distance": distance.item(),
                "dense_loss": dense_loss.item(),
                "word_accuracy": (self.nearest(tokens) == target)[words].float().mean().item(),
            }
        return {"loss": loss}


def transcript_vocabulary(recipe: VisionRecipe, layout, scenes: int = 5000) -> list[int]:
    """Every token id in the transcripts of the first `scenes` stage-1 scenes, and the fill (sorted)."""
    ids = {layout.fill_id}
    for k in range(scenes):
        ids.update(layout.ids(recipe.text_ids, scene_from_seed(TRAIN.seed(TRANSCRIPT_SEED_OFFSET + k))))
    return sorted(ids)


def transcript_accuracy(model: TranscriptModel, recipe: VisionRecipe, layout, batch_size: int = 32) -> dict[str, float]:
    """Held-out check of stage 1 on `TRANSCRIPT_EVAL_SEEDS` (`scenes.EVAL`): the share of transcript words (fill
    excluded) whose image token is nearest to that word's embedding, the same for the shape names' tokens alone, and
    the share of scenes whose count phrase + first object slot are all right."""
    from .scenes import EVAL

    scenes = [scene_from_seed(EVAL.seed(k)) for k in TRANSCRIPT_EVAL_SEEDS]
    shape_ids = torch.tensor(sorted({i for shape in SHAPES for i in recipe.text_ids(" " + shape)}))
    right_words = words = first_right = right_shapes = shapes = 0
    head = layout.count_width + layout.object_width
    with torch.no_grad():
        for start in range(0, len(scenes), batch_size):
            chunk = scenes[start : start + batch_size]
            pixels = torch.stack([scene_pixels(recipe, s) for s in chunk])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                tokens = model.image_tokens(pixels)
            target = model.lookup[torch.tensor([layout.ids(recipe.text_ids, s) for s in chunk])]
            right = model.nearest(tokens.float()) == target
            is_word = (target != model.fill_index) & (target >= 0)
            right_words += int(right[is_word].sum())
            words += int(is_word.sum())
            is_shape = torch.isin(model.vocabulary_ids[target.clamp(min=0)], shape_ids) & is_word
            right_shapes += int(right[is_shape].sum())
            shapes += int(is_shape.sum())
            first_right += int(right[:, :head].all(-1).sum())
    return {"word_accuracy": round(right_words / max(1, words), 4), "shape_word_accuracy": round(right_shapes / max(1, shapes), 4),
            "first_object_exact": round(first_right / len(scenes), 4)}


def _stage_arguments(args: VisionTrainingArguments, folder: str, steps: int, learning_rate: float, vision_lr_scale: float = 1.0) -> VisionTrainingArguments:
    """The `Trainer` arguments of stage 0 or 1 (vision tower + connector alone, in `<output_dir>/<folder>`): the
    vision tower at `vision_lr_scale` x `learning_rate`, the connector at `learning_rate`."""
    return VisionTrainingArguments(
        output_dir=str(Path(args.output_dir) / folder), learning_rate=learning_rate * vision_lr_scale, connector_lr_scale=1.0 / vision_lr_scale,
        max_steps=steps, per_device_train_batch_size=args.transcript_batch_size,
        weight_decay=args.weight_decay, adam_beta2=args.adam_beta2, max_grad_norm=args.max_grad_norm, warmup_steps=100,
        lr_scheduler_type="cosine", bf16=args.bf16, use_cpu=args.use_cpu, logging_steps=50, save_steps=250, save_total_limit=2,
        report_to="none", remove_unused_columns=False, dataloader_num_workers=args.dataloader_num_workers, seed=args.seed,
        disable_tqdm=args.disable_tqdm,
    )


def _train_stage(trainer: Trainer, recipe: VisionRecipe) -> tuple[str | None, float]:
    """Run (or resume) a vision-only stage with eager attention (SDPA's backward costs about twice eager's on CPU);
    returns (the checkpoint it resumed from, seconds)."""
    import time

    resume = last_checkpoint(Path(trainer.args.output_dir))
    started = time.perf_counter()
    implementation = recipe.vision.config._attn_implementation
    recipe.vision.set_attn_implementation("eager")
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        recipe.vision.set_attn_implementation(implementation)
    return resume, round(time.perf_counter() - started, 1)


def _stage_layout(recipe: VisionRecipe):
    from .transcripts import TranscriptLayout

    if recipe.text_ids is None:
        raise ValueError(f"the {recipe.name} recipe has no text_ids: stages 0 and 1 need the text model's tokenizer")
    size = recipe.vision.config.image_size
    image_tokens = recipe.connector(recipe.vision(pixel_values=torch.zeros(1, 3, size, size)).last_hidden_state).shape[1]
    return TranscriptLayout.for_tokenizer(recipe.text_ids, image_tokens), size // recipe.vision.config.patch_size


def train_shapes(recipe: VisionRecipe, args: VisionTrainingArguments, log: Callable[[str], None] = print) -> tuple[dict[str, Any], ShapeWarmupModel]:
    """Stage 0: `args.shape_steps` steps of `ShapeWarmupModel` (the vision tower in place) on stage 1's fresh
    scenes, resumable in `<args.output_dir>/shapes`; returns the held-out `shape_accuracy` + the run's numbers, and
    the model (its object head goes on into stage 1)."""
    layout, patches = _stage_layout(recipe)
    model = ShapeWarmupModel(recipe, args.seed)
    stage_args = _stage_arguments(args, "shapes", args.shape_steps, args.shape_learning_rate)
    dataset = TranscriptSet(recipe, layout, args.shape_steps * args.transcript_batch_size, patches, args.seed + 1)
    log(f"[{recipe.name}] stage 0: {args.shape_steps} steps x {args.transcript_batch_size} fresh scenes, the vision tower alone learns "
        f"each object's shape (peak learning rate {args.shape_learning_rate:g})")
    trainer = VisionTrainer(model=model, args=stage_args, train_dataset=dataset)
    resume, seconds = _train_stage(trainer, recipe)
    accuracy = shape_accuracy(model, recipe, layout)
    log(f"[{recipe.name}] stage 0 done: held-out object shapes right {accuracy:.1%}")
    return {"steps": trainer.state.global_step, "resumed_from": resume, "train_seconds": seconds, "shape_accuracy": accuracy,
            "log_history": [h for h in trainer.state.log_history if "loss" in h]}, model


def train_transcript(vlm, recipe: VisionRecipe, args: VisionTrainingArguments, log: Callable[[str], None] = print,
                     object_head: nn.Module | None = None) -> dict[str, Any]:
    """Stage 1: `args.transcript_steps` steps of `TranscriptModel` (vision tower + connector in place), resumable in
    `<args.output_dir>/transcript`; `object_head`: stage 0's, for `args.object_shape_weight`. Returns the held-out
    `transcript_accuracy` and the run's numbers."""
    layout, patches = _stage_layout(recipe)
    model = TranscriptModel(recipe, vlm.get_input_embeddings().weight, transcript_vocabulary(recipe, layout), layout.fill_id,
                            args.transcript_fill_weight, args.dense_weight, args.seed, args.object_shape_weight, object_head)
    stage_args = _stage_arguments(args, "transcript", args.transcript_steps, args.transcript_learning_rate, args.transcript_vision_lr_scale)
    dataset = TranscriptSet(recipe, layout, args.transcript_steps * args.transcript_batch_size, patches, args.seed)
    log(f"[{recipe.name}] stage 1: {args.transcript_steps} steps x {args.transcript_batch_size} fresh scenes, image tokens -> "
        f"transcripts ({layout.count_width} + {layout.slots} x {layout.object_width} tokens + background), dense targets at vision layer {model.middle_layer}")
    trainer = VisionTrainer(model=model, args=stage_args, train_dataset=dataset)
    resume, seconds = _train_stage(trainer, recipe)
    accuracy = transcript_accuracy(model, recipe, layout)
    log(f"[{recipe.name}] stage 1 done: held-out transcript words right {accuracy['word_accuracy']:.1%} (shape words "
        f"{accuracy['shape_word_accuracy']:.1%}), count + first object exact {accuracy['first_object_exact']:.1%}")
    return {"steps": trainer.state.global_step, "resumed_from": resume, "train_seconds": seconds,
            "layout": dataclasses.asdict(layout), "middle_layer": model.middle_layer, **accuracy,
            "log_history": [h for h in trainer.state.log_history if "loss" in h]}


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Freeze `module` and swap its parameters' data to `dtype`; the originals are returned for `restore_frozen`.

    Swapping `.data` (not `.to()`) keeps the exact float32 weights and the embedding/lm_head tie (one Parameter)."""
    originals = {}
    for name, param in module.named_parameters():
        param.requires_grad_(False)
        originals[name] = param.data
        param.data = param.data.to(dtype)
    return originals


def restore_frozen(module: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Put back the tensors `cast_frozen` swapped out."""
    for name, param in module.named_parameters():
        if name in originals:
            param.data = originals[name]


def last_checkpoint(folder: Path) -> str | None:
    """The newest complete `checkpoint-N` folder under `folder`, or None."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def load_initial_weights(vlm, recipe: VisionRecipe, path: str, log: Callable[[str], None] = print) -> dict[str, torch.Tensor]:
    """Put the vision tower (and, when the file has them, the connector) of `path` into `vlm` before any stage; returns
    the file's probe-head tensors (a checkpoint of the mixture stage has them) for the mixture's probe.

    Keys are those of the trained-tensor checkpoints (`vlm.model.vision_model...`) or of a build's weights file
    (`model.vision_model...`, what `build --retrain --weights` writes; its `recipe.untrained_keys`, which no stage
    trains, are left as they are); a file without the whole vision tower, or with tensors that belong to neither part, is
    refused before anything loads."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    if not any(k.startswith("vlm.") for k in tensors):  # a build's weights file
        tensors = {"vlm." + k: v for k, v in tensors.items() if k not in recipe.untrained_keys}
    parts = {"vision tower": set(recipe.vision.parameters()), "connector": set(recipe.connector.parameters())}
    names = {part: {"vlm." + n for n, p in vlm.named_parameters() if p in params} for part, params in parts.items()}
    probe = {k: v for k, v in tensors.items() if k.startswith("probe_")}
    if unknown := sorted(set(tensors) - names["vision tower"] - names["connector"] - set(probe)):
        raise ValueError(f"{path} has tensors that are not this target's vision tower or connector, e.g. {unknown[:3]}")
    if missing := sorted(names["vision tower"] - set(tensors)):
        raise ValueError(f"{path} lacks {len(missing)} of the vision tower's tensors, e.g. {missing[:3]}")
    present = names["connector"] & set(tensors)
    if present and present != names["connector"]:
        raise ValueError(f"{path} has {len(present)} of the connector's {len(names['connector'])} tensors: all or none")
    has_connector = bool(present)
    vlm.load_state_dict({k.removeprefix("vlm."): v for k, v in tensors.items() if k not in probe}, strict=False)
    log(f"[{recipe.name}] starting from the vision tower{' and connector' if has_connector else ' (the connector starts fresh)'} of {path}")
    return probe


def train_vision(
    vlm, recipe: VisionRecipe, scene_examples: list[InstructionExample], args: VisionTrainingArguments, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train `recipe.vision` and `recipe.connector` of `vlm` in place; resumes from the newest checkpoint in `args.output_dir`.

    Stage 0 (`shape_steps`), stage 1 (`transcript_steps`) and the mixture (`max_steps`; 0: none) run in turn.
    Returns a summary: steps, wall time, the last logged losses and the log history."""
    import time

    probe_tensors = load_initial_weights(vlm, recipe, args.init_weights, log) if args.init_weights else {}
    shapes, shape_model = train_shapes(recipe, args, log) if args.shape_steps > 0 else (None, None)
    object_head = shape_model.object_head if shape_model is not None else None
    transcript = train_transcript(vlm, recipe, args, log, object_head) if args.transcript_steps > 0 else None
    if args.max_steps <= 0:  # a stage-0/1 run alone (Trainer would read max_steps=0 as "train for epochs")
        vlm.eval()
        return {"steps": 0, "shape_stage": shapes, "transcript_stage": transcript,
                "arguments": {k: v for k, v in json.loads(args.to_json_string()).items() if k in _RECORDED_ARGUMENTS}}
    dataset = VisionTrainingSet(recipe, scene_examples, args)
    counts = dataset.counts()
    log(f"[{recipe.name}] {len(dataset):,} training slots: {counts['response']:,} of {len(dataset.responses):,} responses, "
        f"{counts['easy-vqa']:,} easy-VQA questions (of {len(dataset.questions):,}), {counts['caption']:,} captions of fresh scenes")
    wrapper = VisionTrainingModel(vlm, recipe, seed=args.seed)
    wrapper.probe_weight = args.probe_weight
    if probe_tensors:  # a checkpoint of this loop: its probe heads too
        super(VisionTrainingModel, wrapper).load_state_dict(probe_tensors, strict=False)
    originals = cast_frozen(recipe.text_model, torch.bfloat16)
    head = vlm.get_output_embeddings()
    head_originals = cast_frozen(head, torch.bfloat16) if head.weight.dtype != torch.bfloat16 else {}
    implementations = {m: m.config._attn_implementation for m in (recipe.text_model, recipe.vision)}
    for module in implementations:
        module.set_attn_implementation("eager")  # CPU: SDPA's backward costs about twice eager's here
    collator = VisionCollator(recipe, args.probe_scenes_per_step, args.seed)
    trainer = VisionTrainer(model=wrapper, args=args, train_dataset=dataset, data_collator=collator)
    resume = last_checkpoint(Path(args.output_dir))
    resumed_step = int(resume.rsplit("-", 1)[1]) if resume else 0
    if resume:
        log(f"[{recipe.name}] resuming from {resume}")
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        restore_frozen(head, head_originals)
        restore_frozen(recipe.text_model, originals)
        for module, implementation in implementations.items():
            module.set_attn_implementation(implementation)
    vlm.eval()
    history = [h for h in trainer.state.log_history if "loss" in h]
    tail = history[-5:]
    mean = lambda key: round(sum(h.get(key, 0.0) for h in tail) / max(1, len(tail)), 4)  # noqa: E731
    return {
        "steps": trainer.state.global_step,
        "resumed_from": resume,
        "examples": len(dataset),
        "responses": len(dataset.responses),
        "mixture": counts,
        "train_seconds": round(time.perf_counter() - started, 1),
        "steps_this_run": trainer.state.global_step - resumed_step,
        "seconds_per_step": round(result.metrics.get("train_runtime", 0.0) / max(1, trainer.state.global_step - resumed_step), 3),
        "final_loss": mean("loss"),
        "final_answer_loss": mean("answer_loss"),
        "final_token_accuracy": mean("token_accuracy"),
        "final_probe_loss": mean("probe_loss"),
        "log_history": history,
        "shape_stage": shapes,
        "transcript_stage": transcript,
        "arguments": {k: v for k, v in json.loads(args.to_json_string()).items() if k in _RECORDED_ARGUMENTS},
    }


def train_vision_stages(
    vlm,
    recipe: VisionRecipe,
    scene_examples: list[InstructionExample],
    stages: tuple[RetrainStage, ...],
    output_dir: str | Path,
    save_weights: Callable[[Path], object],
    init_weights: str | None = None,
    overrides: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run a committed recipe's `stages` in order on `vlm`, each with `train_vision` in `<output_dir>/<k>-<name>`.

    A finished stage leaves `trained.safetensors` (written by `save_weights(path)`, the target's weights-file format)
    and `summary.json` there; a rerun skips finished stages and resumes the unfinished one from its newest checkpoint,
    so a killed retrain loses at most `save_steps` steps. The first stage starts from `init_weights` (none: the random
    init). `overrides` are `VisionTrainingArguments` values for every stage (e.g. `disable_tqdm`). Returns a summary per
    stage."""
    if not stages:
        raise ValueError(f"the {recipe.name} recipe has no stages")
    unknown = sorted({key for stage in stages for key in stage.arguments} - {f.name for f in dataclasses.fields(VisionTrainingArguments)})
    if unknown:
        raise ValueError(f"the {recipe.name} recipe sets fields VisionTrainingArguments does not have: {unknown}")
    root = Path(output_dir)
    previous, summaries, trained_here = init_weights, [], False
    for index, stage in enumerate(stages):
        folder = root / f"{index}-{stage.name}"
        done, summary_file = folder / "trained.safetensors", folder / "summary.json"
        if done.is_file() and summary_file.is_file():
            log(f"[{recipe.name}] stage {index + 1}/{len(stages)} ({stage.name}) already finished in {folder}")
            summaries.append(json.loads(summary_file.read_text()))
            previous, trained_here = str(done), False
            continue
        log(f"[{recipe.name}] stage {index + 1}/{len(stages)} ({stage.name}): {stage.arguments}")
        args = VisionTrainingArguments(**{**stage.arguments, **(overrides or {}), "output_dir": str(folder), "init_weights": previous})
        summary = {"stage": stage.name, "note": stage.note, **train_vision(vlm, recipe, scene_examples, args, log)}
        save_weights(done)
        tmp = summary_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, default=str))
        tmp.replace(summary_file)
        summaries.append(summary)
        previous, trained_here = str(done), True
    if not trained_here:  # every stage had finished before this run: the model still holds its initial weights
        load_initial_weights(vlm, recipe, previous, log)
    return {"stages": summaries, "steps": sum(s.get("steps", 0) for s in summaries)}


_RECORDED_ARGUMENTS = (
    "max_steps", "per_device_train_batch_size", "learning_rate", "weight_decay", "adam_beta2", "warmup_steps", "lr_scheduler_type",
    "bf16", "seed", "max_response_tokens", "vqa_fraction", "caption_fraction", "connector_lr_scale", "probe_weight", "init_weights", "probe_scenes_per_step",
    "shape_steps", "shape_learning_rate", "object_shape_weight", "transcript_vision_lr_scale",
    "transcript_steps", "transcript_batch_size", "transcript_learning_rate", "transcript_fill_weight", "dense_weight",
)

__all__ = [
    "RetrainStage", "ShapeWarmupModel", "TranscriptModel", "TranscriptSet", "VisionRecipe", "VisionTrainer", "VisionTrainingArguments", "VisionTrainingModel", "VisionTrainingSet",
    "train_shapes", "train_transcript", "train_vision", "train_vision_stages",
]
