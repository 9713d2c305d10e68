"""The shortcuts that make a method run faster compute the same thing as the plain path: padding-free batches
(the labelled head itself is tested in test_labelled_head.py), generating with merged adapters or precomputed soft prompts, and reusing the
eval the trainer logged at its last step."""

from __future__ import annotations

import copy

import pytest
import torch

from chat_fixtures import persian_conversations
from llm_caption.llm.chat_format import tokenize_conversations
from llm_caption.llm.experiment import method_settings
from llm_caption.llm.generation import generate_answers, generation_model
from llm_caption.llm.methods import MethodContext, build_method
from llm_caption.llm.models import train_chat_template
from llm_caption.llm import training as training_module
from llm_caption.llm.scoring import score_characters
from llm_caption.llm.training import train_method
from llm_fixtures import base_model, finetuning_cfg, model_spec, tokenizer  # noqa: F401 (fixtures)

PROMPTS = [[{"role": "user", "content": "یک شعر کوتاه درباره یک دانشجوی دانشگاه تهران بنویس"}],
           [{"role": "user", "content": "Write a short poem about a student"}],
           [{"role": "user", "content": "سلام، حالت چطوره؟"}]]


def _perturbed(base_model, tokenizer, finetuning_cfg, method: str):
    """``method`` on a copy of the base model with every trainable tensor moved off its initial value (so the
    adapter really changes the output, as after training)."""
    method_cfg, _ = method_settings(finetuning_cfg, method)
    model = build_method(copy.deepcopy(base_model), method_cfg, MethodContext(tokenizer=tokenizer, seed=0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * (0.5 * param.abs().mean() + 0.05))
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_padding_free_training_gives_the_padded_losses(method, base_model, tokenizer, model_spec, finetuning_cfg,
                                                       tmp_path):
    """``train_method`` in fp32 with padding-free batches (LoRA) or the padded batches prompt learning keeps
    (prompt tuning): the per-step train losses and the eval loss are those of padded batches."""
    conversations = persian_conversations(20)[10:]
    template = train_chat_template(model_spec)
    train = tokenize_conversations(tokenizer, [(f"t{i}", c) for i, c in enumerate(conversations[:6])], template, 80)
    evaluation = tokenize_conversations(tokenizer, [(f"e{i}", c) for i, c in enumerate(conversations[6:])], template, 80)
    assert len({len(x) for x in train["input_ids"]}) > 1  # padded batches really pad
    method_cfg, training = method_settings(finetuning_cfg, method)
    settings = {**training, "max_steps": 3, "warmup_steps": 0, "per_device_train_batch_size": 2, "eval_steps": 3,
                "save_strategy": "no", "resume": False, "bf16": False}
    results = {}
    for padding_free in (True, False):
        model = build_method(copy.deepcopy(base_model), method_cfg, MethodContext(tokenizer=tokenizer, seed=0))
        results[padding_free] = train_method(model, tokenizer, train, evaluation,
                                             {**settings, "padding_free": padding_free}, tmp_path / str(padding_free),
                                             seed=42)
    losses = {k: [r["loss"] for r in v.loss_history if r["split"] == "train"] for k, v in results.items()}
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert results[True].eval_loss == pytest.approx(results[False].eval_loss, rel=1e-4)


def _greedy_reference(model, tokenizer, conversation, n_tokens: int) -> str:
    """Greedy decoding by the definition: the full forward pass (the one training uses, soft prompts and
    adapters included) over the whole sequence, argmax of the last position, no cache, no batching."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(n_tokens):
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("method", ["lora", "dora", "loha", "prompt_tuning", "prefix_tuning", "p_tuning"])
def test_generation_answers_what_the_trained_forward_pass_predicts(method, base_model, tokenizer, finetuning_cfg):
    model = _perturbed(base_model, tokenizer, finetuning_cfg, method)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = {"max_new_tokens": 8, "do_sample": False}
    answers = generate_answers(model, tokenizer, PROMPTS, settings)  # batched, left-padded, fast route
    expected = [_greedy_reference(model, tokenizer, c, 8) for c in PROMPTS]
    assert answers == expected
    assert answers != generate_answers(base_model, tokenizer, PROMPTS, settings), "the adapter changes nothing"
    # The adapter model itself is untouched: merging happens on a copy.
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())
    if method in ("lora", "dora", "loha"):
        assert type(generation_model(model)).__name__ != type(model).__name__  # merged into a plain model


@pytest.mark.slow
def test_final_eval_loss_is_the_eval_of_the_trained_weights(base_model, tokenizer, model_spec, finetuning_cfg,
                                                            tmp_path, monkeypatch):
    conversations = persian_conversations(6)
    template = train_chat_template(model_spec)
    train = tokenize_conversations(tokenizer, [(f"t{i}", c) for i, c in enumerate(conversations[:4])], template, 64)
    evaluation = tokenize_conversations(tokenizer, [(f"e{i}", c) for i, c in enumerate(conversations[4:])], template, 64)
    method_cfg, training = method_settings(finetuning_cfg, "lora")
    model = build_method(copy.deepcopy(base_model), method_cfg, MethodContext(tokenizer=tokenizer, seed=0))
    settings = {**training, "max_steps": 2, "warmup_steps": 0, "per_device_train_batch_size": 2, "eval_steps": 2,
                "save_strategy": "no", "resume": False}
    result = train_method(model, tokenizer, train, evaluation, settings, tmp_path / "a", seed=42)
    logged = [r["loss"] for r in result.loss_history if r["split"] == "eval" and r["step"] == 2]
    assert logged == [result.eval_loss]
    # The same training with the final evaluation forced to run again gives the same loss.
    monkeypatch.setattr(training_module, "final_eval", lambda trainer: None)
    model = build_method(copy.deepcopy(base_model), method_cfg, MethodContext(tokenizer=tokenizer, seed=0))
    again = train_method(model, tokenizer, train, evaluation, settings, tmp_path / "b", seed=42)
    assert again.eval_loss == result.eval_loss


@pytest.mark.slow
@pytest.mark.parametrize("method", ["base", "layer_freeze"])
def test_methods_without_a_peft_wrapper_train_and_evaluate_under_bf16_autocast(method, base_model, tokenizer,
                                                                              model_spec, finetuning_cfg, tmp_path):
    """``base`` (evaluation only) and ``layer_freeze`` are the model itself, whose forward accelerate wraps in
    autocast when bf16 is on: the labelled head's patched forward must survive that wrapping."""
    conversations = persian_conversations(14)[10:]
    template = train_chat_template(model_spec)
    data = tokenize_conversations(tokenizer, [(f"t{i}", c) for i, c in enumerate(conversations)], template, 64)
    method_cfg, training = method_settings(finetuning_cfg, method)
    model = build_method(copy.deepcopy(base_model), method_cfg, MethodContext(tokenizer=tokenizer, seed=0))
    settings = {**training, "max_steps": 1, "warmup_steps": 0, "per_device_train_batch_size": 2, "eval_steps": 1,
                "save_strategy": "no", "resume": False, "bf16": True}
    result = train_method(model, tokenizer, data, data, settings, tmp_path, seed=42, train=method != "base")
    assert 0 < result.eval_loss < 20
    # Scoring after training (the model unwrapped from autocast) goes through the same patched forward.
    assert 0 < score_characters(model, tokenizer, data).bits_per_character < 20
