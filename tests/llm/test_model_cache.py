"""The converted GGUF tokenizer and model are cached on first load and read back identically."""

from __future__ import annotations

import torch

from llm_caption.llm.models import _pretrained_location, gguf_cache_dir, load_model, load_tokenizer
from llm_fixtures import model_spec  # noqa: F401 (fixture)

TEXT = "سلام، حالت چطوره؟ Write a short poem."


def test_gguf_conversion_is_cached_and_reloads_identically(model_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_CAPTION_MODEL_CACHE", str(tmp_path))
    location, _ = _pretrained_location(model_spec)
    tokenizer_dir = gguf_cache_dir(model_spec, location, "tokenizer")
    model_dir = gguf_cache_dir(model_spec, location, "model")
    assert tokenizer_dir.parent == model_dir.parent and tmp_path in model_dir.parents
    assert not tokenizer_dir.exists() and not model_dir.exists()

    converted_tokenizer = load_tokenizer(model_spec)          # from the GGUF file, then written to the cache
    converted_model = load_model(model_spec, quantization={})
    assert (tokenizer_dir / ".complete").is_file() and (model_dir / ".complete").is_file()
    assert not list(tmp_path.rglob("*.tmp-*"))

    cached_tokenizer = load_tokenizer(model_spec)             # from the cache
    cached_model = load_model(model_spec, quantization={})
    assert cached_tokenizer(TEXT)["input_ids"] == converted_tokenizer(TEXT)["input_ids"]
    assert cached_tokenizer.chat_template == converted_tokenizer.chat_template
    assert (cached_tokenizer.pad_token, cached_tokenizer.eos_token) == (model_spec["pad_token"], "<|im_end|>")
    assert cached_model.name_or_path == converted_model.name_or_path == location
    converted_state, cached_state = converted_model.state_dict(), cached_model.state_dict()
    assert converted_state.keys() == cached_state.keys()
    assert all(torch.equal(converted_state[k], cached_state[k]) for k in converted_state)
    ids = torch.tensor([cached_tokenizer(TEXT)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(converted_model.eval()(input_ids=ids).logits, cached_model.eval()(input_ids=ids).logits)


def test_the_cache_can_be_turned_off(model_spec, monkeypatch):
    monkeypatch.setenv("LLM_CAPTION_MODEL_CACHE", "off")
    location, _ = _pretrained_location(model_spec)
    assert gguf_cache_dir(model_spec, location, "model") is None
