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
from .instruction_data import InstructionExample
from .scenes import COLORS, SHAPES, TRAIN, scene_from_seed

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
    anchor_weight: float = dataclasses.field(default=0.0, metadata={"help": "weight of the word-anchor loss: image tokens over an object are pulled (cosine) towards the text model's own embeddings of its colour and shape words (alternate columns), so the frozen text model reads them as those words from the start (default 0.0: off)"})
    init_weights: str | None = dataclasses.field(default=None, metadata={"help": "start from the trained tensors of this checkpoint (`checkpoint-N/model.safetensors`) instead of the random init; a fresh schedule (default None)"})
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
        table = vlm.get_input_embeddings().weight.detach().float()
        words = lambda names: torch.stack([table[recipe.tokenize("", n, False)[1]].mean(0) for n in names])  # noqa: E731
        self.register_buffer("anchor_shapes", words(PROBE_SHAPES), persistent=False)
        self.register_buffer("anchor_colors", words(PROBE_COLORS), persistent=False)
        self.anchor_weight = 0.0
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
        anchor_loss = self.anchor_loss(features, probe_cells, side) if self.anchor_weight else features.new_zeros(())
        with torch.no_grad():
            self.last_metrics = {
                "answer_loss": answer_loss.item(),
                "token_accuracy": (logits.argmax(-1) == targets[where]).float().mean().item(),
                "probe_loss": probe_loss.item(),
                **({"anchor_loss": anchor_loss.item()} if self.anchor_weight else {}),
            }
        return {"loss": answer_loss + self.probe_weight * probe_loss + self.anchor_weight * anchor_loss}

    def anchor_loss(self, features: torch.Tensor, probe_cells: torch.Tensor, side: int) -> torch.Tensor:
        """Mean cosine distance of the image tokens over an object to its colour word's embedding (even token
        columns) or its shape word's (odd columns); tokens of empty cells and of easy-VQA images are free."""
        rows = torch.arange(side, device=features.device)
        cell = (rows[:, None] * GRID // side) * GRID + (rows[None, :] * GRID // side)  # [side, side] -> cell index
        shape = probe_cells[:, :, 0][:, cell.flatten()]  # [B, tokens]
        color = probe_cells[:, :, 1][:, cell.flatten()]
        occupied = (shape >= 0) & (shape < len(PROBE_SHAPES))
        if not occupied.any():
            return features.new_zeros(())
        even = (rows[None, :] % 2 == 0).expand(side, side).flatten()[None, :].expand_as(occupied)
        targets = torch.where(
            even[..., None], self.anchor_colors[color.clamp(0, len(PROBE_COLORS) - 1)], self.anchor_shapes[shape.clamp(0, len(PROBE_SHAPES) - 1)]
        )
        distance = 1 - F.cosine_similarity(features, targets.to(features.dtype), dim=-1)
        return distance[occupied].mean()


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


def train_vision(
    vlm, recipe: VisionRecipe, scene_examples: list[InstructionExample], args: VisionTrainingArguments, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train `recipe.vision` and `recipe.connector` of `vlm` in place; resumes from the newest checkpoint in `args.output_dir`.

    Returns a summary: steps, wall time, the last logged losses and the log history."""
    import time

    dataset = VisionTrainingSet(recipe, scene_examples, args)
    counts = dataset.counts()
    log(f"[{recipe.name}] {len(dataset):,} training slots: {counts['response']:,} of {len(dataset.responses):,} responses, "
        f"{counts['easy-vqa']:,} easy-VQA questions (of {len(dataset.questions):,}), {counts['caption']:,} captions of fresh scenes")
    wrapper = VisionTrainingModel(vlm, recipe, seed=args.seed)
    wrapper.probe_weight, wrapper.anchor_weight = args.probe_weight, args.anchor_weight
    if args.init_weights:
        from safetensors.torch import load_file

        wrapper.load_state_dict(load_file(args.init_weights))
        log(f"[{recipe.name}] starting from the trained tensors of {args.init_weights}")
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
        "arguments": {k: v for k, v in json.loads(args.to_json_string()).items() if k in _RECORDED_ARGUMENTS},
    }


_RECORDED_ARGUMENTS = (
    "max_steps", "per_device_train_batch_size", "learning_rate", "weight_decay", "adam_beta2", "warmup_steps", "lr_scheduler_type",
    "bf16", "seed", "max_response_tokens", "vqa_fraction", "caption_fraction", "connector_lr_scale", "probe_weight", "anchor_weight", "init_weights", "probe_scenes_per_step",
)

__all__ = ["VisionRecipe", "VisionTrainer", "VisionTrainingArguments", "VisionTrainingModel", "VisionTrainingSet", "train_vision"]
