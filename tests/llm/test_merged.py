"""Merged release weights: a mergeable method folded into its base model answers exactly as base + adapter (greedy,
same tokens), loads without PEFT, and its tokenizer (built from tokenizer.json) encodes and renders as the
project's loader does; methods that cannot merge are left with their adapter. Streaming gives the same answer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from chat_fixtures import load_conf
from gemma_fixtures import tiny_gemma_spec  # noqa: F401 (fixture)
from llm_caption.llm.adapters import load_finetuned, save_finetuned
from llm_caption.llm.experiment import method_settings
from llm_caption.llm.generation import generate_answers
from llm_caption.llm.merged import (MERGED_FILE, ExactTopOutputLayer, load_merged, merge_reason,
                                    use_exact_top_output_layer, write_merged)
from llm_caption.llm.methods import MethodContext, build_method
from llm_caption.llm.models import STOP_TOKENS_ATTR, load_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [[{"role": "user", "content": "یک شعر کوتاه درباره دانشگاه تهران بنویس"}],
           [{"role": "user", "content": "سلام، حالت چطوره؟"}],
           [{"role": "system", "content": "کوتاه پاسخ بده"}, {"role": "user", "content": "Write a short poem"}]]
GENERATION = {"max_new_tokens": 12, "do_sample": False, "no_repeat_ngram_size": 3}


def _saved(spec, method: str, root) -> str:
    """``method`` built on ``spec``'s model, its trainable weights moved off their initial values, saved."""
    cfg = load_conf("conf/base/parameters_llm_finetuning.yml")["llm_finetuning"]
    method_cfg, _ = method_settings(cfg, method)
    torch.manual_seed(0)
    model = build_method(load_model(spec), method_cfg, MethodContext(tokenizer=load_tokenizer(spec), seed=0))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return str(save_finetuned(model, root / method, method, method_cfg, spec))


@pytest.mark.parametrize("method", ["lora", "loha", "dora", "layer_freeze"])
def test_merged_weights_answer_as_the_adapter(tiny_gemma_spec, tmp_path, method):
    adapter = _saved(tiny_gemma_spec, method, tmp_path)
    assert merge_reason(adapter) is None
    folder = write_merged(adapter, tmp_path / "merged")
    assert (folder / MERGED_FILE).is_file() and (folder / "model.safetensors").is_file()
    assert not list(folder.glob("adapter_*"))

    model, tokenizer = load_finetuned(adapter)
    merged, merged_tokenizer = load_merged(folder)
    expected = generate_answers(model, tokenizer, PROMPTS, GENERATION, with_ended=True)
    got = generate_answers(merged, merged_tokenizer, PROMPTS, GENERATION, with_ended=True)
    assert got == expected
    assert any(answer for answer in expected[0]), expected
    # the weights really changed the answers (the merged model is not the bare base model)
    bare = generate_answers(load_model(tiny_gemma_spec).eval(), tokenizer, PROMPTS, GENERATION)
    assert bare != expected[0]


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_virtual_token_methods_keep_their_adapter(tiny_gemma_spec, tmp_path, method):
    adapter = _saved(tiny_gemma_spec, method, tmp_path)
    assert "virtual tokens" in merge_reason(adapter)
    assert write_merged(adapter, tmp_path / "merged") is None
    assert not (tmp_path / "merged").exists()


def test_the_merged_tokenizer_is_the_loaders(tiny_gemma_spec, tmp_path):
    folder = write_merged(_saved(tiny_gemma_spec, "lora", tmp_path), tmp_path / "merged")
    from llm_caption.llm.merged import load_merged_tokenizer

    fast = load_merged_tokenizer(folder)
    slow = load_tokenizer(tiny_gemma_spec)
    text = "سلام! University of Tehran, ۱۴۰۳ <end_of_turn>"
    assert fast(text).input_ids == slow(text).input_ids
    assert fast.apply_chat_template(PROMPTS[2], tokenize=False, add_generation_prompt=True) == \
        slow.apply_chat_template(PROMPTS[2], tokenize=False, add_generation_prompt=True)
    assert (fast.pad_token_id, fast.eos_token_id) == (slow.pad_token_id, slow.eos_token_id)
    assert getattr(fast, STOP_TOKENS_ATTR) == getattr(slow, STOP_TOKENS_ATTR) == ["<start_of_turn>"]


def test_loading_merged_weights_imports_no_peft(tiny_gemma_spec, tmp_path):
    folder = write_merged(_saved(tiny_gemma_spec, "lora", tmp_path), tmp_path / "merged")
    script = ("import json, sys\nfrom llm_caption.llm.merged import load_merged\nload_merged(sys.argv[1])\n"
              "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('peft', 'gguf', 'mlflow'))))")
    run = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []


def test_streamed_pieces_make_the_answer(tiny_gemma_spec, tmp_path):
    model, tokenizer = load_finetuned(_saved(tiny_gemma_spec, "lora", tmp_path))
    for prompt in PROMPTS:
        pieces: list[str] = []
        streamed = generate_answers(model, tokenizer, [prompt], GENERATION, on_text=pieces.append)
        assert streamed == generate_answers(model, tokenizer, [prompt], GENERATION)
        assert "".join(pieces) == streamed[0]
        assert len(pieces) > 1 or len(streamed[0].split()) <= 1
    with pytest.raises(ValueError, match="one conversation at a time"):
        generate_answers(model, tokenizer, PROMPTS, GENERATION, on_text=print)


def test_the_exact_top_output_layer_keeps_the_fp32_winners(tiny_gemma_spec, tmp_path):
    """bf16 logits for the whole vocabulary, the top 64 recomputed in fp32: those equal the fp32 layer's, the rest
    are within bf16 rounding, and greedy answers are the fp32 model's token for token."""
    folder = write_merged(_saved(tiny_gemma_spec, "lora", tmp_path), tmp_path / "merged")
    model, tokenizer = load_merged(folder)
    expected = generate_answers(model, tokenizer, PROMPTS, GENERATION, with_ended=True)
    head = model.get_output_embeddings()
    hidden = torch.randn(3, 5, head.weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = head(hidden)
        fast = ExactTopOutputLayer(head, k=64)(hidden)
    low = torch.nn.functional.linear(hidden.to(torch.bfloat16), head.weight.to(torch.bfloat16)).float()
    top = low.topk(64, dim=-1).indices  # the words the layer recomputes
    assert torch.allclose(fast.gather(-1, top), exact.gather(-1, top), rtol=0, atol=1e-5)
    assert torch.equal(fast.argmax(-1), exact.argmax(-1))
    assert (fast - exact).abs().max() < 0.05 * exact.abs().max()  # bf16 elsewhere: close, not equal
    assert not torch.equal(fast, exact)
    weight = head.weight.clone()
    use_exact_top_output_layer(model)
    assert torch.equal(head.weight, weight) and head.weight.dtype == torch.float32  # the weights are untouched
    assert generate_answers(model, tokenizer, PROMPTS, GENERATION, with_ended=True) == expected
