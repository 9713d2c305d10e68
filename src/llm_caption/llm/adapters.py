"""Save a fine-tuned method's weights and load them back onto the base model.

Adapter methods save with PEFT's ``save_pretrained`` (safetensors). ``layer_freeze`` has no
adapter: only the trained decoder layers' weights are written, to ``trained_layers.safetensors``.
Every directory also holds ``llm_caption_method.json`` (method, builder, options, model spec),
which is all :func:`load_finetuned` needs. A save replaces the method's folder as a whole, through a
temporary sibling folder renamed into place, so a folder that is there is always complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METHOD_FILE = "llm_caption_method.json"
LAYERS_FILE = "trained_layers.safetensors"


def save_finetuned(model, out_dir: str | Path, method: str, method_cfg: Mapping[str, Any],
                   model_spec: Mapping[str, Any]) -> Path:
    """Write the method's trained weights and its description to ``out_dir``, replacing that folder as a whole.

    Everything is written into a temporary sibling folder first, which then takes ``out_dir``'s place
    (:func:`_swap_into_place`), so a save that fails or is killed midway leaves the previous complete folder
    (or none), never a mix of old and new files; the next save removes what such a kill left behind.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out)
    tmp = _sibling(out, "saving")
    _remove(tmp)
    try:
        tmp.mkdir()
        _write_method(model, tmp, method, method_cfg, model_spec)
        _swap_into_place(tmp, out)
    finally:
        _remove(tmp)
    return out


def _write_method(model, out: Path, method: str, method_cfg: Mapping[str, Any],
                  model_spec: Mapping[str, Any]) -> None:
    """The weights (PEFT adapter or trained layers) and, last, ``llm_caption_method.json`` into ``out``."""
    from peft import PeftModel
    from safetensors.torch import save_file

    if isinstance(model, PeftModel):
        model.save_pretrained(out, safe_serialization=True)
    elif method_cfg.get("builder") == "layer_freeze":
        trained = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}
        save_file(trained, str(out / LAYERS_FILE))
    meta = {"method": method, "builder": method_cfg.get("builder"),
            "options": json.loads(json.dumps(dict(method_cfg.get("options") or {}), default=str)),
            "model_spec": dict(model_spec)}
    (out / METHOD_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=2), encoding="utf-8")


def _sibling(out: Path, kind: str, pid: int | None = None) -> Path:
    """This process's temporary folder of ``kind`` (``saving`` or ``old``) next to ``out``."""
    return out.with_name(f".{out.name}.{kind}-{os.getpid() if pid is None else pid}")


def _swap_into_place(new: Path, out: Path) -> None:
    """Put the complete folder ``new`` at ``out``: the previous one renamed aside, ``new`` renamed in, the old
    one deleted. Should the second rename fail, the previous folder is put back."""
    old = _sibling(out, "old")
    _remove(old)
    had_previous = out.exists() or out.is_symlink()
    if had_previous:
        os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        if had_previous and not out.exists():
            os.replace(old, out)
        raise
    _remove(old)


def _remove_leftovers(out: Path) -> None:
    """Delete temporary siblings of ``out`` that a save killed midway left (those of live processes stay)."""
    for kind in ("saving", "old"):
        for path in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and _process_alive(int(pid)) and int(pid) != os.getpid():
                continue
            logger.warning("Removing %s, left by an interrupted save of %s", path, out)
            _remove(path)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    """Delete a folder, file or link if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


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
