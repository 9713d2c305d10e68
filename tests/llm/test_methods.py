"""Every configured method trains 2 real steps on the packaged SmolLM2: what should learn learns, the rest
stays bit-identical, and a saved method reloads to identical logits."""

from __future__ import annotations

import copy

import pytest
import torch

from chat_fixtures import persian_conversations
from llm_caption.llm.adapters import load_finetuned, save_finetuned
from llm_caption.llm.chat_format import tokenize_conversations
from llm_caption.llm.experiment import method_settings
from llm_caption.llm.methods import BUILDERS, MethodContext, build_method, count_parameters, decoder_layers
from llm_caption.llm.models import train_chat_template
from llm_caption.llm.training import train_method
from llm_fixtures import base_model, finetuning_cfg, model_spec, tokenizer  # noqa: F401 (fixtures)

TRAINED_METHODS = ["prompt_tuning", "prefix_tuning", "p_tuning", "lora", "rslora", "dora", "loha", "qlora",
                   "layer_freeze"]


@pytest.fixture
def datasets(tokenizer, model_spec):
    conversations = persian_conversations(6)
    template = train_chat_template(model_spec)
    train = tokenize_conversations(tokenizer, [(f"t{i}", c) for i, c in enumerate(conversations[:4])], template, 80)
    evaluation = tokenize_conversations(tokenizer, [(f"e{i}", c) for i, c in enumerate(conversations[4:])], template, 80)
    return train, evaluation


def test_every_configured_method_has_a_builder_and_the_default_run_trains_them_all(finetuning_cfg):
    methods = finetuning_cfg["methods"]
    assert finetuning_cfg["methods_to_run"] is None
    assert sorted(methods) == sorted(["base", *TRAINED_METHODS])
    assert all(m["builder"] in BUILDERS for m in methods.values())
    assert methods["prompt_tuning"]["options"]["num_virtual_tokens"] == 20
    assert methods["layer_freeze"]["options"]["n_layers"] == 1
    assert methods["rslora"]["options"]["use_rslora"] and methods["dora"]["options"]["use_dora"]
    assert set(methods["lora"]["options"]["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"}


def _stored_weight(param) -> torch.Tensor:
    """The parameter's stored values. bitsandbytes repacks 4-bit weights into a CPU-kernel layout on the
    first forward pass (same values, other byte order): undo that exact permutation before comparing."""
    state = getattr(param, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        data, _ = _convert_weight_packed_for_cpu_inverse(param.data, copy.deepcopy(state))
        return data.reshape(-1, 1).clone()
    return param.detach().clone()


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: _stored_weight(p) for name, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("method", TRAINED_METHODS)
def test_two_steps_train_only_the_method_parameters_and_reload_identically(
        method, base_model, tokenizer, model_spec, finetuning_cfg, datasets, tmp_path):
    method_cfg, training = method_settings(finetuning_cfg, method)
    model = build_method(copy.deepcopy(base_model), method_cfg, MethodContext(tokenizer=tokenizer))
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    before = _snapshot(model)

    train, evaluation = datasets
    settings = {**training, "max_steps": 2, "warmup_steps": 0, "per_device_train_batch_size": 2, "eval_strategy": "no",
                "save_strategy": "no", "resume": False}
    result = train_method(model, tokenizer, train, evaluation, settings, tmp_path / "ckpt", seed=42)
    assert result.steps == 2 and [r["step"] for r in result.loss_history if r["split"] == "train"] == [1, 2]
    assert result.eval_loss > 0 and result.tokens_per_s > 0 and result.peak_memory_mb > 100

    after = {name: _stored_weight(p) for name, p in model.named_parameters()}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "no parameter changed after 2 steps"
    assert changed <= trainable_names, f"frozen parameters changed: {sorted(changed - trainable_names)[:5]}"
    # Every trainable tensor moved (DoRA's magnitudes, LoRA's A and B, soft prompts, whole layers).
    assert changed == trainable_names, f"trainable parameters that did not change: {sorted(trainable_names - changed)[:5]}"
    if method == "layer_freeze":
        n_layers = len(decoder_layers(model))
        layer_ids = {int(n.split(".layers.")[1].split(".")[0]) for n in changed}
        assert layer_ids == {0, n_layers - 1}

    saved = save_finetuned(model, tmp_path / method, method, method_cfg, model_spec)
    reloaded, _ = load_finetuned(saved, base_model=copy.deepcopy(base_model), tokenizer=tokenizer)
    trained_state = {n: p.detach() for n, p in model.named_parameters() if n in trainable_names}
    reloaded_state = dict(reloaded.named_parameters())
    if method != "p_tuning":  # PEFT saves P-tuning's encoder *output* (the virtual tokens), not the encoder
        for name, value in trained_state.items():
            assert torch.equal(value, reloaded_state[name].detach()), name
    if method == "qlora":
        # bitsandbytes' CPU 4-bit path computes differently once a layer has run in training mode
        # (its weights are repacked for the inference kernel), so logits of the trained object and of a
        # fresh reload are not bit-comparable; the saved adapter tensors are (checked above).
        return
    model.eval()
    batch = torch.tensor([train[0]["input_ids"][:32]])
    with torch.no_grad():
        expected, actual = model(input_ids=batch).logits, reloaded(input_ids=batch).logits
    assert torch.equal(expected, actual), (expected - actual).abs().max()


def test_prefix_initialised_from_text_acts_like_that_text_in_context(base_model, tokenizer):
    init, n = "به فارسی پاسخ بده. تو یک دستیار مفید فارسی‌زبان هستی.", 8
    model = build_method(copy.deepcopy(base_model), {"builder": "prefix_tuning",
                                                     "options": {"num_virtual_tokens": n, "init_text": init}},
                         MethodContext(tokenizer=tokenizer, seed=0)).eval()
    prefix_ids = tokenizer(init, add_special_tokens=False)["input_ids"][:n]
    ids = tokenizer("سلام، حالت چطوره؟", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        with_prefix = model(input_ids=torch.tensor([ids])).logits[0]
        with_text = base_model.eval()(input_ids=torch.tensor([prefix_ids + ids])).logits[0, n:]
        random_prefix = build_method(copy.deepcopy(base_model), {"builder": "prefix_tuning",
                                                                 "options": {"num_virtual_tokens": n}},
                                     MethodContext(tokenizer=tokenizer, seed=0)).eval()(
            input_ids=torch.tensor([ids])).logits[0]
    assert torch.allclose(with_prefix, with_text, atol=1e-3), (with_prefix - with_text).abs().max()
    assert not torch.allclose(random_prefix, with_text, atol=1e-1)
    with pytest.raises(ValueError, match="prefix_projection: false"):
        build_method(copy.deepcopy(base_model), {"builder": "prefix_tuning", "options": {
            "num_virtual_tokens": n, "init_text": init, "prefix_projection": True}}, MethodContext(tokenizer=tokenizer))
