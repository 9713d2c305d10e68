"""Save a fine-tuned method's weights and load them back onto the base model.

Adapter methods save with PEFT's ``save_pretrained`` (safetensors). ``layer_freeze`` has no
adapter: only the trained decoder layers' weights are written, to ``trained_layers.safetensors``.
Every directory also holds ``llm_caption_method.json`` (method, builder, options, model spec),
which is all :func:`load_finetuned` needs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METHOD_FILE = "llm_caption_method.json"
LAYERS_FILE = "trained_layers.safetensors"


def save_finetuned(model, out_dir: str | Path, method: str, method_cfg: Mapping[str, Any],
                   model_spec: Mapping[str, Any]) -> Path:
    """Write the method's trained weights and its description to ``out_dir``."""
    from peft import PeftModel
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        model.save_pretrained(out, safe_serialization=True)
    elif method_cfg.get("builder") == "layer_freeze":
        trained = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}
        save_file(trained, str(out / LAYERS_FILE))
    meta = {"method": method, "builder": method_cfg.get("builder"),
            "options": json.loads(json.dumps(dict(method_cfg.get("options") or {}), default=str)),
            "model_spec": dict(model_spec)}
    (out / METHOD_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=2), encoding="utf-8")
    return out


def read_method(adapter_dir: str | Path) -> dict[str, Any]:
    """The ``llm_caption_method.json`` of a saved method, with a clear error when it is missing."""
    path = Path(adapter_dir) / METHOD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {adapter_dir} is not a saved llm_finetuning method")
    return json.loads(path.read_text(encoding="utf-8"))


def load_finetuned(adapter_dir: str | Path, base_model=None, tokenizer=None):
    """(model, tokenizer) of a saved method: base model from its spec plus the saved weights, in eval mode.

    ``base_model`` (an fp32 model of the same spec; it is modified) and ``tokenizer`` avoid loading them again.
    """
    from peft import PeftModel
    from safetensors.torch import load_file

    from .models import load_model, load_tokenizer, quantize_model

    adapter_dir = Path(adapter_dir)
    meta = read_method(adapter_dir)
    spec = meta["model_spec"]
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    model = base_model if base_model is not None else load_model(spec)
    if meta["builder"] == "qlora":
        model = quantize_model(model, meta["options"]["quantization"])
    if (adapter_dir / "adapter_config.json").is_file():
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    elif meta["builder"] == "layer_freeze":
        state = load_file(str(adapter_dir / LAYERS_FILE))
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{adapter_dir / LAYERS_FILE}: weights not in the model: {result.unexpected_keys[:5]}")
    model.eval()
    return model, tokenizer
