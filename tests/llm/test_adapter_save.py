"""Saving a fine-tuned method replaces its folder as a whole: a save that fails or is killed midway leaves the
previous complete folder, loadable, and no temporary folder behind (after the next save)."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_caption.llm.adapters import LAYERS_FILE, METHOD_FILE, load_finetuned, save_finetuned

REPO_ROOT = Path(__file__).resolve().parents[2]
LORA = {"builder": "lora", "options": {"r": 2}}
LAYER_FREEZE = {"builder": "layer_freeze", "options": {"train_layers": 1}}
SPEC = {"name": "tiny-llama"}


def tiny_base(seed: int = 0) -> torch.nn.Module:
    """A two-layer Llama of random weights (the adapter code does not care about the size)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def tiny_lora(seed: int) -> torch.nn.Module:
    """A LoRA model whose adapter weights depend on ``seed`` (not the zero init), on the same base."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_base(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_()
    return model


def tiny_layer_freeze(seed: int) -> torch.nn.Module:
    """The base with its last decoder layer 'trained' (new random weights, the only ones requiring grad)."""
    model = tiny_base()
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.layers.1."))
        if p.requires_grad:
            with torch.no_grad():
                p.normal_()
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.arange(1, 9).unsqueeze(0)).logits


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def load(folder: Path) -> torch.nn.Module:
    model, _ = load_finetuned(folder, base_model=tiny_base(), tokenizer=object())
    return model


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def test_a_save_replaces_the_folder_as_a_whole(tmp_path):
    out = tmp_path / "adapters" / "method"
    save_finetuned(tiny_lora(1), out, "method", LORA, SPEC)
    assert (out / "adapter_config.json").is_file()
    trained = tiny_layer_freeze(2)
    save_finetuned(trained, out, "method", LAYER_FREEZE, SPEC)

    # No adapter file of the earlier save is left for the loader to prefer over the trained layers.
    assert sorted(files(out)) == [METHOD_FILE, LAYERS_FILE]
    loaded = load(out)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(loaded), logits(trained), rtol=0, atol=0)
    assert siblings(out) == []


def _fail_midway(target: str, monkeypatch) -> None:
    """Make the weights writer ``target`` write half a file and then fail, as a full disk would."""
    def write_half_and_fail(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\x00" * 100)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(target, write_half_and_fail)


@pytest.mark.parametrize(("cfg", "build", "writer"), [
    (LORA, tiny_lora, "peft.peft_model.safe_save_file"),
    (LAYER_FREEZE, tiny_layer_freeze, "safetensors.torch.save_file"),
], ids=["lora", "layer_freeze"])
def test_a_save_that_fails_midway_leaves_the_previous_folder(tmp_path, monkeypatch, cfg, build, writer):
    out = tmp_path / "adapters" / "method"
    first = build(1)
    save_finetuned(first, out, "method", cfg, SPEC)
    before = files(out)
    expected = logits(first)

    _fail_midway(writer, monkeypatch)
    with pytest.raises(OSError, match="No space left on device"):
        save_finetuned(build(2), out, "method", cfg, SPEC)

    assert files(out) == before
    torch.testing.assert_close(logits(load(out)), expected, rtol=0, atol=0)
    assert siblings(out) == []


KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import peft.peft_model
from test_adapter_save import LORA, SPEC, tiny_lora
from llm_caption.llm.adapters import save_finetuned

def write_half_and_die(tensors, filename, *args, **kwargs):
    Path(filename).write_bytes(b"\\x00" * 100)
    os.kill(os.getpid(), signal.SIGKILL)

peft.peft_model.safe_save_file = write_half_and_die
save_finetuned(tiny_lora(2), {out!r}, "method", LORA, SPEC)
"""


@pytest.mark.slow
def test_a_killed_save_leaves_the_previous_folder_and_the_next_save_cleans_up(tmp_path):
    out = tmp_path / "adapters" / "method"
    first = tiny_lora(1)
    save_finetuned(first, out, "method", LORA, SPEC)
    before = files(out)

    script = KILLED_SAVE.format(tests=str(Path(__file__).parent), out=str(out))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    # The kill left its half-written temporary folder, but the method's folder is the previous one, whole.
    (leftover,) = siblings(out)
    assert leftover.startswith(".method.saving-")
    assert files(out) == before
    torch.testing.assert_close(logits(load(out)), logits(first), rtol=0, atol=0)

    # A temporary folder of a process that is still running is not touched; the dead one's is removed.
    live = out.with_name(f".method.saving-{os.getppid()}")
    live.mkdir()
    second = tiny_lora(3)
    save_finetuned(second, out, "method", LORA, SPEC)
    assert siblings(out) == [live.name]
    torch.testing.assert_close(logits(load(out)), logits(second), rtol=0, atol=0)
