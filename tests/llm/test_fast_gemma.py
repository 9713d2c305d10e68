"""The plain-torch Gemma-3 path of a merged chat model (``llm/fast_gemma.py``) answers with the tokens that
``transformers``' ``generate`` gives for the same weights and settings (fp32, batched and one at a time, every
logits processor the registered models use); its tokenizer renders, encodes and decodes as
``PreTrainedTokenizerFast``; the low-precision output layers keep the fp32 winners; the decode file written at
merge time holds what it would otherwise work out at start-up."""

from __future__ import annotations

import pytest
import torch

from gemma_fixtures import tiny_gemma_spec  # noqa: F401 (fixture)
from llm_caption.llm.fast_gemma import (DECODE_FILE, FolderTokenizer, GemmaChat, unsupported, unsupported_settings,
                                        write_decode_file)
from llm_caption.llm.generation import generate_answers, non_persian_tokens
from llm_caption.llm.merged import load_merged, write_merged
from test_merged import PROMPTS, _saved

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = [
    {"max_new_tokens": 12, "do_sample": False, "no_repeat_ngram_size": 3},
    # the Persian study's decoding: end-of-turn boost, other scripts penalised, stop tokens
    {"max_new_tokens": 14, "do_sample": False, "repetition_penalty": 1.0, "no_repeat_ngram_size": 3,
     "exponential_decay_length_penalty": [4, 1.5], "non_persian_penalty": 2.0, "stop_tokens": ["<start_of_turn>"]},
    {"max_new_tokens": 10, "do_sample": False, "repetition_penalty": 1.3},
]


@pytest.fixture(scope="module")
def merged(tiny_gemma_spec, tmp_path_factory):
    root = tmp_path_factory.mktemp("fast_gemma")
    folder = write_merged(_saved(tiny_gemma_spec, "lora", root), root / "merged")
    return folder


def test_the_folder_tokenizer_is_the_transformers_tokenizer(merged):
    _, tokenizer = load_merged(merged)
    fast = FolderTokenizer(merged)
    for conversation in PROMPTS:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert fast.prompt(conversation) == text
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert fast.encode(text) == ids
        assert fast.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)
    assert fast.pad_token_id == tokenizer.pad_token_id and fast.eos_token_id == tokenizer.eos_token_id
    assert torch.equal(fast.non_persian_ids(), non_persian_tokens(tokenizer))
    with pytest.raises(ValueError, match="not a token"):
        fast.stop_ids(["<no such token>"])


@pytest.mark.parametrize("settings", SETTINGS)
def test_answers_are_generate_s_tokens(merged, settings):
    model, tokenizer = load_merged(merged)
    chat = GemmaChat(merged, body_dtype="float32", head="fp32")
    expected = generate_answers(model, tokenizer, PROMPTS, settings, with_ended=True)  # batched, left-padded
    assert chat.answer(PROMPTS, settings, with_ended=True) == expected
    for prompt in PROMPTS:
        assert chat.answer([prompt], settings) == generate_answers(model, tokenizer, [prompt], settings)
    assert any(expected[0]), expected


def test_the_network_s_logits_match(merged):
    model, tokenizer = load_merged(merged)
    chat = GemmaChat(merged, body_dtype="float32", head="fp32")
    ids = torch.tensor([chat.tokenizer.encode(chat.tokenizer.prompt(PROMPTS[2]))])
    with torch.no_grad():
        expected = model(input_ids=ids).logits[:, -1]
    cache = [tuple(torch.zeros(1, chat.kv_heads, ids.shape[1], chat.head_dim) for _ in range(2)) for _ in chat.layers]
    hidden = chat.forward(ids, torch.arange(ids.shape[1])[None], cache, 0, torch.ones_like(ids, dtype=torch.bool))
    got = chat.logits(hidden, torch.tensor([], dtype=torch.long))
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("head", ["bf16", "int8", "int4"])
def test_a_low_precision_head_keeps_the_fp32_winners(merged, head):
    exact = GemmaChat(merged, body_dtype="float32", head="fp32")
    fast = GemmaChat(merged, body_dtype="float32", head=head)
    hidden = torch.randn(4, exact.out.shape[1], generator=torch.Generator().manual_seed(0))
    stops = torch.tensor([1, 106])
    full = exact.logits(hidden, stops)
    got = fast.logits(hidden, stops)
    top = fast.approximate(hidden).topk(fast.top_k, dim=-1).indices  # the words it recomputes
    assert torch.allclose(got.gather(-1, top), full.gather(-1, top), atol=1e-5, rtol=0)
    assert torch.allclose(got[:, stops], full[:, stops], atol=1e-5, rtol=0)  # stop tokens always exact
    assert torch.equal(got.argmax(-1), full.argmax(-1))
    assert not torch.equal(got, full)  # the rest is approximate
    assert fast.answer(PROMPTS, SETTINGS[1]) == exact.answer(PROMPTS, SETTINGS[1])


def test_streamed_pieces_make_the_answer(merged):
    chat = GemmaChat(merged)
    for prompt in PROMPTS:
        pieces: list[str] = []
        streamed = chat.answer([prompt], SETTINGS[0], on_text=pieces.append)
        assert streamed == chat.answer([prompt], SETTINGS[0])
        assert "".join(pieces) == streamed[0]
    with pytest.raises(ValueError, match="one conversation at a time"):
        chat.answer(PROMPTS, SETTINGS[0], on_text=print)


def test_the_decode_file_holds_the_int8_head_and_the_other_script_ids(merged, tmp_path):
    import shutil

    folder = tmp_path / "merged"
    shutil.copytree(merged, folder)
    (folder / DECODE_FILE).unlink(missing_ok=True)
    computed = GemmaChat(folder)
    write_decode_file(folder)
    cached = GemmaChat(folder)
    assert cached.head == "int4"
    assert torch.equal(cached.out_low, computed.out_low) and torch.equal(cached.out_scale, computed.out_scale)
    assert torch.equal(cached._non_persian, computed.other_script_ids())
    assert (merged / DECODE_FILE).is_file()  # write_merged writes it for a Gemma-3 model


def test_what_the_path_does_not_cover_is_said(merged, tmp_path):
    assert unsupported(merged) is None
    assert unsupported_settings(SETTINGS[1]) is None
    assert unsupported_settings({"do_sample": True}) == "sampling"
    assert "num_beams" in unsupported_settings({"num_beams": 2})
    assert "config.json" in unsupported(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert "llama" in unsupported(tmp_path)
    with pytest.raises(ValueError, match="llama"):
        GemmaChat(tmp_path)
    with pytest.raises(ValueError, match="sampling"):
        GemmaChat(merged).generate([[2, 3]], {"do_sample": True}, [1])
