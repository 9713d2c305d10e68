"""The chat model built from a registered model's folder (``llm_caption.llm.pyfunc.load_local``, no MLflow, no
unpickling) answers and refuses exactly as ``mlflow.pyfunc.load_model`` of the same folder; the chat command
answers a champion of a local sqlite store without importing MLflow; a folder that is not this project's chat
model (another pickle, an artifact path out of the folder, no settings artifact) is left to MLflow."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models.utils import _enforce_params_schema
from mlflow.types.schema import ParamSchema

from chat_fixtures import load_conf
from conftest import mlflow_state, restore_mlflow_state
from gemma_fixtures import tiny_gemma_spec  # noqa: F401 (fixture)
from llm_caption.caption import local_registered_model
from llm_caption.llm.adapters import save_finetuned
from llm_caption.llm.experiment import method_settings
from llm_caption.llm.methods import MethodContext, build_method
from llm_caption.llm.models import load_model
from llm_caption.llm.pyfunc import (ChatLimits, ChatPredictor, ChatRequestError, LocalChatModel,
                                    generation_signature, load_local, write_settings)
from llm_caption.llm.registration import register_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = "persian-chat-adapter"
CHAMPION = f"models:/{MODEL}@champion"
GENERATION = {"max_new_tokens": 6, "do_sample": False, "repetition_penalty": 1.2}
LIMITS = {"max_conversations": 2, "max_new_tokens": 16}
QUESTION = "سلام، حالت چطوره؟"


@pytest.fixture(scope="module")
def registered(tiny_gemma_spec, empty_store, tmp_path_factory):
    """A LoRA adapter of the tiny Gemma model (moved off its initial value, so that it changes the answers)
    registered as ``persian-chat-adapter@champion`` in a local sqlite store; the store, the model's folder and the
    model loaded from it by ``mlflow.pyfunc.load_model``."""
    root = tmp_path_factory.mktemp("chat_store")
    cfg = load_conf("conf/base/parameters_llm_finetuning.yml")["llm_finetuning"]
    method_cfg, _ = method_settings(cfg, "lora")
    torch.manual_seed(0)
    from llm_caption.llm.models import load_tokenizer

    model = build_method(load_model(tiny_gemma_spec), method_cfg,
                         MethodContext(tokenizer=load_tokenizer(tiny_gemma_spec), seed=0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    adapter = save_finetuned(model, root / "adapters" / "lora", "lora", method_cfg, tiny_gemma_spec)
    shutil.copy2(empty_store, root / "mlflow.db")
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    state = mlflow_state()  # a module fixture: outside conftest's per-test restore
    try:
        mlflow.set_tracking_uri(tracking)
        mlflow.set_experiment("chat-local-load")
        decision = register_adapter(str(adapter), "lora", 1.0, "split-a", MODEL, generation=GENERATION,
                                    pip_requirements=["mlflow"], limits=LIMITS)
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        restore_mlflow_state(state)
    assert decision["promoted"], decision
    folder = local_registered_model(tracking, CHAMPION)
    assert folder is not None
    return {"tracking": tracking, "folder": Path(folder), "root": root,
            "mlflow_model": mlflow.pyfunc.load_model(folder)}


def test_the_folder_loaded_model_answers_and_refuses_as_the_mlflow_loaded_model(registered):
    slow = registered["mlflow_model"]
    fast = load_local(registered["folder"])
    assert isinstance(fast, LocalChatModel)
    assert type(slow.unwrap_python_model()).__name__ == "PersianChatModel"
    for loaded in (fast, slow):  # the settings and limits logged with the model, not the defaults
        assert loaded.unwrap_python_model().limits == ChatLimits.from_config(LIMITS)
        assert loaded.unwrap_python_model().generation == GENERATION

    system = [{"role": "system", "content": "پاسخ کوتاه بده"}, {"role": "user", "content": QUESTION}]
    answered = [
        ([[{"role": "user", "content": QUESTION}]], {"max_new_tokens": 6, "do_sample": False,
                                                     "repetition_penalty": 1.2}),  # the chat command's request
        ([system, "یک شعر کوتاه بنویس"], None),  # the logged defaults
        ([QUESTION], {"max_new_tokens": np.int64(3), "repetition_penalty": 1, "num_beams": 4}),  # converted; dropped
        (pd.DataFrame({"prompt": [QUESTION]}), {"repetition_penalty": 1.5}),
    ]
    replies = []
    for model_input, params in answered:
        reply = fast.predict(model_input, params=params)
        assert reply == slow.predict(model_input, params=params), (model_input, params)
        replies += reply
    assert any(r.strip() for r in replies) and len(set(replies)) > 1, replies

    refused = [
        ([QUESTION], {"max_new_tokens": 10**9}),
        ([QUESTION], {"do_sample": True}),
        ([QUESTION], {"repetition_penalty": 50.0}),
        ([QUESTION], {"max_new_tokens": "6"}),  # a type MLflow's own check refuses
        ([QUESTION], {"max_new_tokens": True, "do_sample": 1}),
        ([QUESTION], "max_new_tokens=6"),
        ([5], None),
        ([None], None),
        ([], None),
        ([QUESTION] * 3, None),
        (pd.DataFrame({"text": [QUESTION]}), None),
        ([[{"role": "root", "content": QUESTION}]], None),
        ([QUESTION, "  "], None),
    ]
    for model_input, params in refused:
        with pytest.raises(MlflowException) as mlflow_error:
            slow.predict(model_input, params=params)
        with pytest.raises(ChatRequestError) as local_error:
            fast.predict(model_input, params=params)
        assert mlflow_error.value.error_code == "INVALID_PARAMETER_VALUE"
        assert local_error.value.message == mlflow_error.value.message, (model_input, params)
        assert "\n" not in local_error.value.message


def test_request_params_are_what_mlflow_hands_the_model():
    settings = {**GENERATION, "stop_tokens": ["<end_of_turn>"]}
    params_json = generation_signature(settings).to_dict()["params"]
    local = LocalChatModel(ChatPredictor(settings, LIMITS), params_json)
    schema = ParamSchema.from_json(params_json)
    cases = [None, {}, {"repetition_penalty": 1, "max_new_tokens": 4}, {"do_sample": False, "num_beams": 2},
             {"max_new_tokens": np.int64(5), "repetition_penalty": np.float32(1.5)}, {"max_new_tokens": None},
             {1: 2, "max_new_tokens": 7}, {"repetition_penalty": 1.25, "do_sample": np.bool_(False)}]
    for params in cases:
        expected = _enforce_params_schema(copy.deepcopy(params), schema)
        got = local.request_params(copy.deepcopy(params))
        assert list(got.items()) == list(expected.items()), params
        assert [type(v) for v in got.values()] == [type(v) for v in expected.values()], params
    for params in [[("max_new_tokens", 4)], {"max_new_tokens": 4.0}, {"do_sample": "false", "max_new_tokens": "x"}]:
        with pytest.raises(MlflowException) as expected_error:
            _enforce_params_schema(copy.deepcopy(params), schema)
        with pytest.raises(ChatRequestError) as error:
            local.request_params(copy.deepcopy(params))
        assert error.value.message == expected_error.value.message


@pytest.mark.parametrize("store", ["--tracking-uri", "MLFLOW_TRACKING_URI"])
def test_the_chat_command_answers_a_local_champion_without_importing_mlflow(registered, tmp_path, store):
    """Named on the command line or found the default way (here ``$MLFLOW_TRACKING_URI``), a champion in a local
    sqlite store answers without MLflow being imported."""
    expected = registered["mlflow_model"].predict([QUESTION], params=GENERATION)[0]
    result = tmp_path / "result.json"
    script = (
        "import json, sys\n"
        "from llm_caption import chat\n"
        "args, question, result = sys.argv[1:-2], sys.argv[-2], sys.argv[-1]\n"
        "chat.main([*args, '--max-new-tokens', '6', question])\n"
        "try:\n"
        "    chat.main([*args, '--max-new-tokens', '100000', question])\n"
        "    refusal = None\n"
        "except SystemExit as exit:\n"
        "    refusal = str(exit.code)\n"
        "json.dump({'refusal': refusal, 'mlflow': sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'),\n"
        "           'transformers': sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft'))},\n"
        "          open(result, 'w'))\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
           "KEDRO_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if store == "--tracking-uri":
        args = ["--tracking-uri", registered["tracking"]]
    else:
        args, env["MLFLOW_TRACKING_URI"] = [], registered["tracking"]
    run = subprocess.run([sys.executable, "-c", script, *args, "--threads", "1",
                          "--model-uri", CHAMPION, QUESTION, str(result)], capture_output=True, text=True, env=env,
                         timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == expected + "\n"
    out = json.loads(result.read_text())
    assert out["mlflow"] == []
    assert out["transformers"] == []  # merged Gemma-3 weights, greedy: the plain-torch path (llm.fast_gemma)
    assert out["refusal"] == "error: max_new_tokens must be an integer from 1 to 16, got 100000"


def _edited_copy(registered, tmp_path: Path, edit) -> Path:
    """A copy of the registered model's folder (beside a copy of its adapter) with ``edit(folder, mlmodel)``."""
    folder = tmp_path / "model"
    shutil.copytree(registered["folder"], folder, symlinks=True)
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    edit(folder, mlmodel)
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return folder


class _Touch:
    """Unpickled, it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _artifacts(mlmodel: dict) -> dict:
    return mlmodel["flavors"]["python_function"]["artifacts"]


def _move_out(folder: Path, mlmodel: dict, name: str) -> None:
    """The artifact ``name`` moved beside the folder and its path pointed there."""
    spec = _artifacts(mlmodel)[name]
    shutil.move(folder / spec["path"], folder.parent / "outside")
    spec["path"] = "../outside"


def _link_out(folder: Path, mlmodel: dict) -> None:
    """The settings file replaced by a link to a copy outside the folder (its path in MLmodel unchanged)."""
    inside = folder / _artifacts(mlmodel)["settings"]["path"]
    shutil.move(inside, folder.parent / "settings.json")
    inside.symlink_to(folder.parent / "settings.json")


@pytest.mark.parametrize("case", ["as_logged", "foreign_pickle", "settings_out", "adapter_out", "pickle_out",
                                  "settings_link_out", "no_settings", "other_loader", "code"])
def test_load_local_leaves_other_folders_to_mlflow(registered, tmp_path, case):
    marker = tmp_path / "unpickled"
    pyfunc = lambda mlmodel: mlmodel["flavors"]["python_function"]  # noqa: E731
    edits = {
        "as_logged": lambda folder, mlmodel: None,
        "foreign_pickle": lambda folder, mlmodel: (folder / "python_model.pkl").write_bytes(
            pickle.dumps(_Touch(marker))),
        "settings_out": lambda folder, mlmodel: _move_out(folder, mlmodel, "settings"),
        "adapter_out": lambda folder, mlmodel: _move_out(folder, mlmodel, "adapter"),
        "pickle_out": lambda folder, mlmodel: (shutil.move(folder / "python_model.pkl", tmp_path / "model.pkl"),
                                               pyfunc(mlmodel).update(python_model="../model.pkl")),
        "settings_link_out": _link_out,
        "no_settings": lambda folder, mlmodel: _artifacts(mlmodel).pop("settings"),  # a model logged before it
        "other_loader": lambda folder, mlmodel: pyfunc(mlmodel).update(loader_module="mlflow.sklearn"),
        "code": lambda folder, mlmodel: pyfunc(mlmodel).update(code="code"),
    }
    folder = _edited_copy(registered, tmp_path, edits[case])
    loaded = load_local(folder)
    if case == "as_logged":
        assert isinstance(loaded, LocalChatModel)
    else:
        assert loaded is None
    assert not marker.exists()  # the pickle is never run


def test_settings_that_json_would_change_are_an_error(tmp_path):
    assert json.loads(write_settings(ChatPredictor({**GENERATION, "stop_tokens": ["<end_of_turn>"]}, LIMITS),
                                     tmp_path).read_text())["limits"]["max_new_tokens"] == 16
    with pytest.raises(ValueError, match=r"generation.stop_tokens = \('<end_of_turn>',\) \(tuple\) is not a JSON"):
        write_settings(ChatPredictor({**GENERATION, "stop_tokens": ("<end_of_turn>",)}), tmp_path)
    with pytest.raises(ValueError, match=r"generation.repetition_penalty = .*\(float64\) is not a JSON"):
        write_settings(ChatPredictor({**GENERATION, "repetition_penalty": np.float64(1.2)}), tmp_path)


def test_the_chat_command_streams_and_holds_a_conversation(registered, tmp_path):
    """Without a message the command is a conversation: each answer streamed after ``model>``, the history sent
    with the next message, ``/reset`` clearing it, a refused message reported without ending it, Ctrl-D leaving."""
    model = registered["mlflow_model"]
    first = model.predict([[{"role": "user", "content": QUESTION}]], params={"max_new_tokens": 6})[0]
    follow_up = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first},
                 {"role": "user", "content": "بیشتر بگو"}]
    second = model.predict([follow_up], params={"max_new_tokens": 6})[0]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
           "KEDRO_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    stdin = f"{QUESTION}\nبیشتر بگو\n{'x' * 5000}\n/reset\n{QUESTION}\n"
    run = subprocess.run([sys.executable, "-m", "llm_caption.chat", "--tracking-uri", registered["tracking"],
                          "--threads", "1", "--max-new-tokens", "6", "--model-uri", CHAMPION], input=stdin,
                         capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    replies = [line.split("model> ", 1)[1] for line in run.stdout.splitlines() if "model> " in line]
    assert replies[0] == first and replies[1] == second and replies[3] == first, run.stdout
    assert replies[2].startswith("error: ") and "5,000 characters; at most 4,000 per message" in replies[2], run.stdout
    assert "(conversation cleared)" in run.stdout
    with pytest.raises(SystemExit, match="--seed seeds sampling"):
        from llm_caption import chat

        chat.main(["--model-uri", CHAMPION, "--seed", "1", QUESTION])
