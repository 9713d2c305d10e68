"""Parameter-efficient fine-tuning methods: one registry, method name -> builder.

A method is configured in ``parameters_llm_finetuning.yml`` as::

    lora:
      builder: lora                  # key of BUILDERS
      options: {r: 16, lora_alpha: 32, lora_dropout: 0.0, target_modules: [...]}
      training: {learning_rate: 1.0e-3}   # overrides of the shared training settings

so a new method that differs by options only (``rslora``, ``dora``) is YAML alone; a new
family is one builder here. A builder takes the (fp32) base model, the method's ``options``
and a :class:`MethodContext` and returns the model to train, with exactly the parameters
that should learn set to ``requires_grad=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..common import count_parameters  # noqa: F401 - the study counts through this module
from .models import quantize_model

logger = logging.getLogger(__name__)


@dataclass
class MethodContext:
    """What builders may need besides the model: the tokenizer (text-initialised prompts) and the seed
    that makes adapter initialisation (LoRA's A, soft prompts, prefixes) reproducible."""

    tokenizer: Any = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _freeze_all(model) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


def build_base(model, options: Mapping[str, Any], ctx: MethodContext):
    """No training: the reference row. Every parameter stays frozen."""
    _freeze_all(model)
    return model


def _init_token_ids(ctx: MethodContext, text: str, n: int, method: str) -> list[int]:
    """Exactly ``n`` token ids of ``text`` (repeated when shorter), for text-initialised virtual tokens."""
    if ctx.tokenizer is None:
        raise ValueError(f"{method}.init_text needs the tokenizer")
    ids = ctx.tokenizer(text, add_special_tokens=False)["input_ids"]
    return (ids * (n // max(len(ids), 1) + 1))[:n]


def build_prompt_tuning(model, options: Mapping[str, Any], ctx: MethodContext):
    """Soft prompt of ``num_virtual_tokens`` vectors, optionally initialised from the embeddings of ``init_text``."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    opts = dict(options)
    init_text = opts.pop("init_text", None)
    peft_model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, **opts))
    if init_text:
        ids = _init_token_ids(ctx, init_text, peft_model.peft_config["default"].num_virtual_tokens, "prompt_tuning")
        with torch.no_grad():
            embeddings = model.get_input_embeddings().weight[torch.tensor(ids)].detach().clone()
            peft_model.prompt_encoder["default"].embedding.weight.copy_(embeddings)
    return peft_model


def build_prefix_tuning(model, options: Mapping[str, Any], ctx: MethodContext):
    """Trainable key/value prefixes in every layer, optionally initialised from the model's own keys and values
    of ``init_text`` (Li & Liang, 2021: random prefixes of a small model start far off and train poorly)."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    opts = dict(options)
    init_text = opts.pop("init_text", None)
    if init_text and opts.get("prefix_projection"):
        raise ValueError("prefix_tuning.init_text needs prefix_projection: false (the prefixes are the parameters)")
    prefixes = _text_key_values(model, ctx, init_text, int(opts["num_virtual_tokens"])) if init_text else None
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, **opts))
    if prefixes is not None:
        embedding = peft_model.prompt_encoder["default"].embedding
        if tuple(embedding.weight.shape) != tuple(prefixes.shape):
            raise ValueError(f"prefix_tuning.init_text: key/values of shape {tuple(prefixes.shape)} do not fit "
                             f"the prefix table {tuple(embedding.weight.shape)}")
        with torch.no_grad():
            embedding.weight.copy_(prefixes)
    return peft_model


def _text_key_values(model, ctx: MethodContext, text: str, n: int) -> torch.Tensor:
    """``[n, layers * 2 * kv_heads * head_dim]``: the keys and values the model computes for the first ``n``
    tokens of ``text`` (repeated when shorter), laid out as PEFT's prefix table (per layer: key, then value)."""
    ids = _init_token_ids(ctx, text, n, "prefix_tuning")
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([ids], device=model.device), use_cache=True).past_key_values
    per_layer = []
    for layer in range(len(cache)):
        key, value = _cache_layer(cache, layer)  # [1, kv_heads, n, head_dim] each
        per_layer += [key[0].permute(1, 0, 2).reshape(n, -1), value[0].permute(1, 0, 2).reshape(n, -1)]
    return torch.cat(per_layer, dim=1).float()


def _cache_layer(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):  # transformers >= 4.56 Cache objects
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache[layer][0], cache[layer][1]


def build_p_tuning(model, options: Mapping[str, Any], ctx: MethodContext):
    """Virtual tokens produced by a small prompt encoder (MLP/LSTM)."""
    from peft import PromptEncoderConfig, TaskType, get_peft_model

    return get_peft_model(model, PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, **options))


def build_lora(model, options: Mapping[str, Any], ctx: MethodContext):
    """LoRA (and its variants by option: ``use_rslora``, ``use_dora``)."""
    from peft import LoraConfig, TaskType, get_peft_model

    return get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, **options))


def build_loha(model, options: Mapping[str, Any], ctx: MethodContext):
    """LoHa: low-rank Hadamard-product adapters."""
    from peft import LoHaConfig, TaskType, get_peft_model

    return get_peft_model(model, LoHaConfig(task_type=TaskType.CAUSAL_LM, **options))


def build_qlora(model, options: Mapping[str, Any], ctx: MethodContext):
    """QLoRA: base weights quantised with bitsandbytes (``quantization``: NF4 4-bit), LoRA on top."""
    from peft import prepare_model_for_kbit_training

    opts = dict(options)
    quantization = opts.pop("quantization")
    quantized = quantize_model(model, quantization)
    quantized = prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False)
    return build_lora(quantized, opts, ctx)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM (``model.model.layers`` for Llama-style models)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find decoder layers in {type(model).__name__}")
    return layers


def frozen_layer_indices(n_layers: int, n_trainable: int) -> list[int]:
    """Indices of the first and last ``n_trainable`` layers (the ones that train)."""
    if n_trainable < 1 or 2 * n_trainable > n_layers:
        raise ValueError(f"layer_freeze.n_layers={n_trainable} must be in 1..{n_layers // 2} for {n_layers} layers")
    return sorted(set(range(n_trainable)) | set(range(n_layers - n_trainable, n_layers)))


def build_layer_freeze(model, options: Mapping[str, Any], ctx: MethodContext):
    """No adapter: freeze everything but the first and last ``n_layers`` decoder layers."""
    _freeze_all(model)
    layers = decoder_layers(model)
    trained = frozen_layer_indices(len(layers), int(options.get("n_layers", 1)))
    for index in trained:
        for param in layers[index].parameters():
            param.requires_grad_(True)
    model.llm_caption_trained_layers = trained
    logger.info("layer_freeze: training decoder layers %s of %d", trained, len(layers))
    return model


BUILDERS: dict[str, Callable[[Any, Mapping[str, Any], MethodContext], Any]] = {
    "none": build_base,
    "prompt_tuning": build_prompt_tuning,
    "prefix_tuning": build_prefix_tuning,
    "p_tuning": build_p_tuning,
    "lora": build_lora,
    "loha": build_loha,
    "qlora": build_qlora,
    "layer_freeze": build_layer_freeze,
}


def build_method(model, method_cfg: Mapping[str, Any], ctx: MethodContext):
    """Apply the method described by ``method_cfg`` (``builder`` + ``options``) to ``model``."""
    builder = method_cfg.get("builder")
    if builder not in BUILDERS:
        raise ValueError(f"unknown method builder {builder!r}; known: {sorted(BUILDERS)}")
    if ctx.seed is not None:
        from transformers import set_seed

        set_seed(ctx.seed)
    return BUILDERS[builder](model, dict(method_cfg.get("options") or {}), ctx)
