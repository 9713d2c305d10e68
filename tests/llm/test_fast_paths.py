"""The shortcuts that make a method run faster compute the same thing as the plain path: scoring only the
labelled positions in the LM head, generating with merged adapters or precomputed soft prompts, and reusing the
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
from llm_caption.llm.training import labelled_positions_only, train_method
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


def test_scoring_only_labelled_positions_gives_the_same_loss_and_gradients(base_model, tokenizer, model_spec):
    from trl.trainer import utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    conversations = persian_conversations(3)
    data = tokenize_conversations(tokenizer, [(f"c{i}", c) for i, c in enumerate(conversations)],
                                  train_chat_template(model_spec), 64)
    length = min(len(x) for x in data["input_ids"])
    input_ids = torch.tensor([x[:length] for x in data["input_ids"]])
    labels = torch.tensor([x[:length] for x in data["labels"]])
    assert 0 < int((labels != -100).sum()) < labels.numel()  # some positions are not scored

    model = copy.deepcopy(base_model).train()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    probe = model.model.layers[0].mlp.down_proj.weight

    def loss_and_grad():
        model.zero_grad()
        out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        return out.loss.detach(), probe.grad.detach().clone(), out.entropy.detach()

    original = trl_utils._use_triton
    full = loss_and_grad()
    with labelled_positions_only() as active:
        assert active and trl_utils._use_triton is not original
        compact = loss_and_grad()
    assert trl_utils._use_triton is original
    torch.testing.assert_close(compact[0], full[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compact[1], full[1], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(compact[2], full[2], rtol=1e-4, atol=1e-5)


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
