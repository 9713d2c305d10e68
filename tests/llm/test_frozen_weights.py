"""Frozen linear weights cast to bf16 once per training call (llm/frozen_weights.py): the same forward and
backward as autocast's per-call casts, on SmolLM2 with a LoRA adapter (the study's path) and on a tiny random
Gemma-3; the parameters are never touched, and the attention implementation set for training is restored."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model

from chat_fixtures import persian_conversations
from gemma_fixtures import gemma_tokenizer, tiny_gemma_spec  # noqa: F401 (fixtures)
from llm_caption.llm.chat_format import tokenize_conversations
from llm_caption.llm.frozen_weights import cast_weight, frozen_weights_cast
from llm_caption.llm.labelled_head import PaddingFreeCollator, add_labelled_head
from llm_caption.llm.models import load_model, train_chat_template
from llm_caption.llm.training import attention_implementation
from llm_fixtures import base_model, model_spec, tokenizer  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@pytest.fixture(params=["smollm2", "tiny_gemma3"])
def lora_and_batch(request, base_model, tokenizer, model_spec, tiny_gemma_spec, gemma_tokenizer):  # noqa: F811
    if request.param == "smollm2":
        model, tok, spec = copy.deepcopy(base_model), tokenizer, model_spec
    else:
        model, tok, spec = load_model(tiny_gemma_spec), gemma_tokenizer, tiny_gemma_spec
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, init_lora_weights=False, **LORA))
    add_labelled_head(model)
    data = tokenize_conversations(tok, [(f"c{i}", c) for i, c in enumerate(persian_conversations(8))],
                                  train_chat_template(spec), 64)
    batch = PaddingFreeCollator()([data[i] for i in range(4)])
    return request.param, model.train(), batch


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch, labelled_head=True, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_cast_once_gives_autocasts_forward_and_backward_bit_for_bit(lora_and_batch):
    name, model, batch = lora_and_batch
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, grads = _step(model, batch)
    with frozen_weights_cast(model) as patched:
        frozen = sum(1 for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad)
        assert patched == frozen > 0, name
        cast_loss, cast_grads = _step(model, batch)
        again, _ = _step(model, batch)  # the second step reads the cached copies
    assert torch.equal(cast_loss, loss) and torch.equal(again, loss), name
    assert grads.keys() == cast_grads.keys() and len(grads) > 0
    for key in grads:
        assert torch.equal(cast_grads[key], grads[key]), (name, key)
    # Nothing of the model changed: same parameters, no patched forward left behind.
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("forward" in m.__dict__ for m in model.modules() if type(m) is torch.nn.Linear)


def test_shared_input_casts_keep_the_forward_and_stay_within_bf16_of_the_gradients(lora_and_batch):
    name, model, batch = lora_and_batch
    loss, grads = _step(model, batch)
    with frozen_weights_cast(model, share_inputs=True) as patched:
        assert patched == sum(1 for m in model.modules() if type(m) is torch.nn.Linear)
        shared_loss, shared_grads = _step(model, batch)
    # One bf16 copy of an activation feeds q/k/v and the adapters' first matrices: the forward is the same
    # products; the backward sums those layers' input gradients in bf16 before the cast back to fp32.
    # Measured: at most 3.1% of a gradient's largest element (SmolLM2, layer 2 q_proj lora_A).
    assert torch.equal(shared_loss, loss), name
    for key in grads:
        scale = float(grads[key].abs().max())
        assert float((shared_grads[key] - grads[key]).abs().max()) <= 0.05 * scale + 1e-8, (name, key)


def test_outside_autocast_and_after_a_weight_change_the_layer_reads_its_weight():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4).requires_grad_(False)
    x = torch.randn(3, 8)
    with frozen_weights_cast(layer):
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))  # fp32, no autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            first = layer(x)
            assert cast_weight(layer).dtype == torch.bfloat16
            with torch.no_grad():
                layer.weight.add_(1.0)  # in place: the copy is remade
            second = layer(x)
            expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
        assert torch.equal(second, expected) and not torch.equal(first, second)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cast_weight(layer) is layer.weight  # the block is over


def test_training_attention_is_restored_afterwards(base_model):  # noqa: F811
    model = copy.deepcopy(base_model)
    before = model.config._attn_implementation
    other = "eager" if before != "eager" else "sdpa"
    with attention_implementation(model, other):
        assert model.config._attn_implementation == other
    assert model.config._attn_implementation == before
