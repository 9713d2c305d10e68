"""A fine-tuned method's weights merged into its base model: a plain transformers model folder that loads fast.

For methods whose weights can be folded into the base model's (LoRA, rsLoRA, DoRA, LoHa, LoKr: PEFT's
``merge_and_unload``; ``layer_freeze``, whose trained layers replace the base model's), :func:`write_merged`
saves the merged model (safetensors, in the base model's dtype), its tokenizer (``tokenizer.json``, with the pad
and end-of-turn tokens and the chat template the method was trained with) and ``llm_caption_merged.json`` (the
stop tokens and where it came from). :func:`load_merged` reads it back with no PEFT import, no GGUF conversion and
no ``AutoTokenizer`` probing: the tokenizer straight from ``tokenizer.json``. The answers are the adapter's
(greedy, same tokens: tested); generation through the adapter merges a copy the same way
(:func:`llm_caption.llm.generation.generation_model`).

Methods that cannot be merged (prompt tuning, prefix tuning, P-tuning: their virtual tokens are inputs, not
weights; QLoRA: its base weights are 4-bit) have no merged folder and load through their adapter.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .fast_gemma import MERGED_FILE, TOKENIZER_FILE, exact_top  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

MERGEABLE_PEFT = {"LORA", "LOHA", "LOKR"}


def merge_reason(adapter_dir: str | Path) -> str | None:
    """None when the saved method in ``adapter_dir`` can be merged, else why not (one line)."""
    from .adapters import read_method

    adapter_dir = Path(adapter_dir)
    meta = read_method(adapter_dir)
    if meta.get("builder") == "qlora" or (meta.get("model_spec") or {}).get("quantization"):
        return "its base weights are 4-bit (QLoRA): the adapter is kept"
    if meta.get("builder") == "layer_freeze":
        return None
    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        return f"no adapter_config.json and builder {meta.get('builder')!r} is not layer_freeze"
    peft_type = str(json.loads(config.read_text(encoding="utf-8")).get("peft_type", "")).upper()
    if peft_type not in MERGEABLE_PEFT:
        return f"{peft_type or 'its'} adapter adds virtual tokens, not weights: the adapter is kept"
    return None


def write_merged(adapter_dir: str | Path, out_dir: str | Path) -> Path | None:
    """Merge the saved method of ``adapter_dir`` into its base model and save it to ``out_dir`` (replaced as a
    whole); None (and nothing written) when the method cannot be merged (:func:`merge_reason`)."""
    from .adapters import load_finetuned, read_method
    from .models import STOP_TOKENS_ATTR

    reason = merge_reason(adapter_dir)
    if reason is not None:
        logger.info("%s is not merged: %s", adapter_dir, reason)
        return None
    import time

    start = time.perf_counter()
    meta = read_method(adapter_dir)
    model, tokenizer = load_finetuned(adapter_dir)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.saving-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if not (tmp / TOKENIZER_FILE).is_file():
            raise ValueError(f"the tokenizer of {adapter_dir} saved no {TOKENIZER_FILE} (not a fast tokenizer)")
        info = {"method": meta.get("method"), "builder": meta.get("builder"),
                "base_model": {k: v for k, v in (meta.get("model_spec") or {}).items() if isinstance(v, (str, int, float))},
                "stop_tokens": list(getattr(tokenizer, STOP_TOKENS_ATTR, ()) or ()),
                "pad_token": tokenizer.pad_token, "eos_token": tokenizer.eos_token}
        (tmp / MERGED_FILE).write_text(json.dumps(info, ensure_ascii=False, indent=2), encoding="utf-8")
        from .fast_gemma import unsupported, write_decode_file

        if unsupported(tmp) is None:  # what the plain-torch path would otherwise work out at every start
            write_decode_file(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    logger.info("%s merged into its base model: %s (%.0f MB) in %.1f s", meta.get("method"), out, size / 1e6,
                time.perf_counter() - start)
    return out


def is_merged_dir(folder: str | Path) -> bool:
    return (Path(folder) / MERGED_FILE).is_file()


def load_merged_tokenizer(folder: str | Path):
    """The tokenizer of a merged folder: the fast tokenizer of its ``tokenizer.json`` and ``tokenizer_config.json``
    (no ``AutoTokenizer`` probing of model configs and tokenizer classes), with its pad/eos tokens, chat template
    and stop tokens."""
    from transformers import PreTrainedTokenizerFast

    from .models import STOP_TOKENS_ATTR

    folder = Path(folder)
    info = json.loads((folder / MERGED_FILE).read_text(encoding="utf-8"))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    if info.get("pad_token"):
        tokenizer.pad_token = info["pad_token"]
    if info.get("eos_token"):
        tokenizer.eos_token = info["eos_token"]
    if not tokenizer.chat_template and (template := _chat_template(folder)):
        tokenizer.chat_template = template
    stops = info.get("stop_tokens") or []
    vocab = tokenizer.get_vocab()
    unknown = [t for t in stops if t not in vocab]
    if unknown:
        raise ValueError(f"{folder / MERGED_FILE}: stop tokens {unknown} are not in {folder / TOKENIZER_FILE}")
    setattr(tokenizer, STOP_TOKENS_ATTR, list(stops))
    tokenizer.name_or_path = str(folder)
    return tokenizer


def _chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def load_merged(folder: str | Path, dtype: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a merged folder, in eval mode; ``dtype`` defaults to the saved one."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if not is_merged_dir(folder):
        raise FileNotFoundError(f"{folder / MERGED_FILE} not found: {folder} is not a merged model folder")
    tokenizer = load_merged_tokenizer(folder)
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {"dtype": "auto"}
    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=False, **kwargs)
    model.eval()
    return model, tokenizer


class ExactTopOutputLayer:
    """A language model's output layer for generation: the logits of the whole vocabulary from a bf16 copy of the
    weights (half the bytes to read per token: the layer is memory-bound on a CPU), then the ``k`` highest
    recomputed in fp32 from the original weights (:func:`exact_top`). Greedy decoding picks the same token as the
    fp32 layer whenever the fp32 winner is among the bf16 top ``k`` (the bf16 logits are off by far less than the
    usual gap between the 1st and the 64th word); the other logits keep their bf16 value."""

    def __init__(self, layer, k: int = 64) -> None:
        import torch

        self.layer = layer
        self.k = int(k)
        self.low = layer.weight.detach().to(torch.bfloat16)

    def __call__(self, hidden):
        import torch
        import torch.nn.functional as F

        logits = F.linear(hidden.to(torch.bfloat16), self.low).float()
        return exact_top(logits, hidden, self.layer.weight, self.k, self.layer.bias)


def use_exact_top_output_layer(model, k: int = 64):
    """Route ``model``'s output layer through :class:`ExactTopOutputLayer` (in place; returns the model)."""
    import torch

    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.weight.dtype != torch.float32:
        return model
    fast = ExactTopOutputLayer(head, k)
    head.forward = fast  # the module (and its tied weight) stays; only its forward changes
    return model
