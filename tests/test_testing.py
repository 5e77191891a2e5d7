"""Tests for hf_dream.testing: tiny offline VLM factories."""

import pytest
import torch

from hf_dream.testing import (
    MROPE_TINY_FAMILIES,
    SUPPORTED_TINY_FAMILIES,
    build_tiny_target,
    image_feature_counts,
    image_token_counts,
    make_tiny_inputs,
    tiny_inputs_row,
)

FAMILIES = list(SUPPORTED_TINY_FAMILIES)
_CACHE: dict = {}


@pytest.fixture(params=FAMILIES)
def tiny(request):
    family = request.param
    if family not in _CACHE:
        _CACHE[family] = build_tiny_target(family, seed=0)
    return family, _CACHE[family]


def _new_tokens(model, inputs, n=16):
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


def _other_pixels(inputs, seed):
    pv = inputs["pixel_values"]
    g = torch.Generator().manual_seed(seed)
    # keep zero padding (pixtral padded images, llava_next padded tiles) as is
    return torch.randn(pv.shape, generator=g) * (pv != 0)


def test_unknown_family_lists_supported():
    with pytest.raises(ValueError) as exc:
        build_tiny_target("blip2")
    for fam in SUPPORTED_TINY_FAMILIES:
        assert fam in str(exc.value)


def test_basic_properties(tiny):
    family, model = tiny
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    spec = model.tiny_spec
    assert spec.family == family
    assert model.config.image_token_id == spec.image_token_id
    text_cfg = model.config.get_text_config()
    assert text_cfg.eos_token_id == spec.eos_token_id == model.generation_config.eos_token_id
    assert text_cfg.pad_token_id == spec.pad_token_id == model.generation_config.pad_token_id
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_deterministic_weights():
    a = build_tiny_target("llava", seed=3).state_dict()
    b = build_tiny_target("llava", seed=3).state_dict()
    c = build_tiny_target("llava", seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_vocab_size_override():
    model = build_tiny_target("gemma3", vocab_size=512)
    assert model.config.get_text_config().vocab_size == 512
    inputs = make_tiny_inputs(model)
    assert model(**inputs).logits.shape[-1] == 512


def test_forward_and_image_token_count(tiny):
    family, model = tiny
    spec = model.tiny_spec
    inputs = make_tiny_inputs(model, num_images=2, batch_size=2)
    ids = inputs["input_ids"]

    n_tok = image_token_counts(model, inputs)
    assert n_tok == image_feature_counts(model, inputs)
    assert all(n > 0 for n in n_tok)
    if spec.tokens_per_image is not None:
        assert n_tok == [2 * spec.tokens_per_image] * 2

    # random text never hits a special id; the specials that do appear are structural
    lo, hi = spec.text_token_range
    assert not set(range(lo, hi)) & set(spec.special_token_ids)
    for t in ids[inputs["attention_mask"].bool()].tolist():
        assert t in spec.special_token_ids or lo <= t < hi
    n_text = sum(lo <= t < hi for t in ids[1].tolist())
    assert n_text == (5 + 1) + (7 + 1)  # row 1 has one extra token before and after
    if family in ("pixtral", "mistral3"):
        assert (ids == spec.image_end_token_id).sum(-1).tolist() == [2, 2]
        assert (ids == spec.image_break_token_id).sum() > 0
    if family == "gemma3":
        assert torch.equal(inputs["token_type_ids"], (ids == spec.image_token_id).long())
        assert spec.image_token_id >= spec.vocab_size  # OOV like PaliGemma
    if family == "gemma4":
        assert torch.equal(inputs["mm_token_type_ids"], (ids == spec.image_token_id).long())
        assert spec.image_token_id < spec.vocab_size  # inside the vocab, as in the real checkpoints
        assert (ids == spec.boi_token_id).sum(-1).tolist() == [2, 2]
    if family == "internvl":
        assert (ids == spec.start_image_token_id).sum(-1).tolist() == (ids == spec.end_image_token_id).sum(-1).tolist() == [2, 2]
    if family == "idefics3":
        assert (ids == spec.fake_image_token_id).sum(-1).tolist() == [4, 4]
    if family in MROPE_TINY_FAMILIES:
        assert n_tok == [8 + 6] * 2 and inputs["image_grid_thw"].tolist() == [[1, 4, 8], [1, 6, 4]] * 2
        assert torch.equal(inputs["mm_token_type_ids"], (ids == spec.image_token_id).int())

    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (*ids.shape, spec.vocab_size)
    assert torch.isfinite(out.logits).all()


def test_generate_depends_on_image(tiny):
    family, model = tiny
    differ = 0
    seeds = range(4)
    for seed in seeds:
        inputs = make_tiny_inputs(model, seed=seed)
        a = _new_tokens(model, inputs)
        assert a.shape[1] > 0
        other = dict(inputs, pixel_values=_other_pixels(inputs, 1000 + seed))
        b = _new_tokens(model, other)
        differ += a.shape != b.shape or not torch.equal(a, b)
        with torch.no_grad():
            la = model(**inputs).logits[:, -1]
            lb = model(**other).logits[:, -1]
        assert not torch.allclose(la, lb, atol=1e-4), "logits ignore the image"
    assert differ >= len(seeds) - 1, f"{family}: greedy output depends on the image for only {differ}/4 seeds"


def test_batch2_left_padded_generate(tiny):
    family, model = tiny
    inputs = make_tiny_inputs(model, seed=1, batch_size=2)
    mask = inputs["attention_mask"]
    assert mask[0, 0] == 0 and mask[1].all(), "row 0 should be left padded"
    assert (inputs["input_ids"][0][mask[0] == 0] == model.tiny_spec.pad_token_id).all()

    batched = _new_tokens(model, inputs, n=48)
    assert batched.shape[0] == 2
    for row in range(2):
        single = _new_tokens(model, tiny_inputs_row(model, inputs, row), n=48)[0]
        assert torch.equal(batched[row, : single.shape[0]], single), f"{family}: row {row} differs when batched"


def test_full_forward_reproduces_greedy(tiny):
    """One forward over prompt+generated tokens (with the image) agrees with cached greedy decoding."""
    family, model = tiny
    spec = model.tiny_spec
    inputs = make_tiny_inputs(model, seed=2, num_images=2)
    gen = _new_tokens(model, inputs, n=12)
    if family not in ("gemma3", "gemma4"):  # untied lm_head: specials (except eos) are never emitted
        assert not any(t in spec.special_token_ids and t != spec.eos_token_id for t in gen[0].tolist())
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], gen], 1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    for key in ("token_type_ids", "mm_token_type_ids"):
        if key in inputs:
            full[key] = torch.cat([inputs[key], torch.zeros_like(gen, dtype=inputs[key].dtype)], 1)
    if family == "gemma4":  # tied lm_head: only the placeholder rows are zeroed, so no placeholder is emitted
        assert not {spec.image_token_id, spec.video_token_id} & set(gen[0].tolist())
    with torch.no_grad():
        logits = model(**full).logits
    L = inputs["input_ids"].shape[1]
    assert torch.equal(logits[0, L - 1 : -1].argmax(-1), gen[0])


def test_tiny_tokenizer_is_one_character_per_token():
    from hf_dream.testing import build_tiny_tokenizer

    model = build_tiny_target("llava")
    tokenizer = build_tiny_tokenizer(model)
    ids = list(range(model.tiny_spec.vocab_size))
    text = tokenizer.decode(ids)
    assert len(text) == len(ids) and len(set(text)) == len(ids)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids


def test_image_first_rows_start_with_an_image_placeholder(tiny):
    family, model = tiny
    spec = model.tiny_spec
    inputs = make_tiny_inputs(model, seed=4, batch_size=2, image_first=True, text_len_before=0)
    for row in range(2):
        ids = tiny_inputs_row(model, inputs, row)["input_ids"][0].tolist()
        assert ids[0] == spec.image_token_id  # no bos, no text, no opening delimiter of the image block
    assert image_token_counts(model, inputs) == image_feature_counts(model, inputs)
    with pytest.raises(ValueError, match="image_first"):
        make_tiny_inputs(model, image_first=True)  # text before the image contradicts it
