"""Generation stops at the stop tokens (``generation.stop_tokens`` and the model spec's ``stop_tokens``) on every
generation route (merged adapters, soft prompts, prefix cache), in the chat pyfunc and the chat command, and the
answer is the text before the stop token; an unknown token string is a clear error; a request cannot set them."""

from __future__ import annotations

import copy

import pytest
import torch
from mlflow.exceptions import MlflowException
from transformers import LogitsProcessor, LogitsProcessorList

from chat_fixtures import load_conf
from gemma_fixtures import tiny_gemma_spec  # noqa: F401 (fixture)
from llm_caption.llm.experiment import answer_metrics, ended_rate, method_settings
from llm_caption.llm.generation import STOP_TOKENS_ATTR, generate_answers
from llm_caption.llm.methods import MethodContext, build_method
from llm_caption.llm.models import load_model, load_tokenizer
from llm_caption.llm.pyfunc import ChatLimits, generation_settings, generation_signature

PROMPTS = [[{"role": "user", "content": "سلام، حالت چطوره؟"}],
           [{"role": "user", "content": "یک شعر کوتاه درباره دانشگاه تهران بنویس"}]]
NEW_TURN = "<start_of_turn>"


class ForceTokenAt(LogitsProcessor):
    """Makes every row's ``step``-th new token (from 0) ``token_id``; counts the decoding steps it saw."""

    def __init__(self, step: int, token_id: int):
        self.step, self.token_id, self.start, self.calls = step, token_id, None, 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:  # prompt ids (or none, when generating from embeddings) at the first step
            self.start = input_ids.shape[1]
        self.calls += 1
        if input_ids.shape[1] - self.start == self.step:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.token_id] = 0.0
        return scores


@pytest.fixture(scope="module")
def tiny(tiny_gemma_spec):
    """(spec without stop tokens, its tokenizer, the tiny model, the methods config)."""
    spec = {k: v for k, v in tiny_gemma_spec.items() if k != "stop_tokens"}
    torch.manual_seed(0)
    return spec, load_tokenizer(spec), load_model(spec).eval(), \
        load_conf("conf/base/parameters_llm_finetuning.yml")["llm_finetuning"]


def _method_model(tiny, method: str):
    spec, tokenizer, model, cfg = tiny
    if method == "base":
        return model
    method_cfg, _ = method_settings(cfg, method)
    built = build_method(copy.deepcopy(model), method_cfg, MethodContext(tokenizer=tokenizer, seed=0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the adapter off its (often identity) initial value, as after training
        for param in built.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return built.eval()


def test_the_gemma_spec_stops_at_a_new_turn_by_default():
    spec = load_conf("conf/base/parameters.yml")["llm_models"]["gemma3_270m"]
    assert spec["eos_token"] == "<end_of_turn>" and NEW_TURN in spec["stop_tokens"]


@pytest.mark.parametrize("method", ["base", "lora", "prompt_tuning", "prefix_tuning", "p_tuning"])
def test_generation_stops_at_a_stop_token_and_the_answer_excludes_it(method, tiny):
    spec, tokenizer, _, _ = tiny
    model = _method_model(tiny, method)
    new_turn = tokenizer.convert_tokens_to_ids(NEW_TURN)

    def answers(settings, tok=tokenizer):
        force = ForceTokenAt(3, new_turn)  # the model opens a new turn as its 4th token
        out = generate_answers(model, tok, PROMPTS, {"max_new_tokens": 8, "do_sample": False,
                                                      "logits_processor": LogitsProcessorList([force]), **settings})
        return out, force.calls

    prefix = generate_answers(model, tokenizer, PROMPTS, {"max_new_tokens": 3, "do_sample": False})
    assert all(prefix), prefix  # three real tokens before the forced one

    running, steps = answers({})  # without stop tokens the rows go on after the new turn
    assert steps == 8
    assert all(r.startswith(p) and len(r) > len(p) for r, p in zip(running, prefix)), (running, prefix)

    stopped, steps = answers({"stop_tokens": [NEW_TURN]})
    assert steps == 4  # generation ended at the stop token, not at max_new_tokens
    assert stopped == prefix  # the text before it: neither the stop token nor what would follow
    assert not any(NEW_TURN in a for a in stopped)

    # The model spec's stop tokens (recorded on the tokenizer by load_tokenizer) stop it the same way.
    spec_tokenizer = load_tokenizer({**spec, "stop_tokens": [NEW_TURN]})
    assert getattr(spec_tokenizer, STOP_TOKENS_ATTR) == [NEW_TURN]
    assert answers({}, spec_tokenizer) == (prefix, 4)


def test_an_unknown_stop_token_is_an_error_naming_it_and_the_model(tiny):
    spec, tokenizer, model, _ = tiny
    with pytest.raises(ValueError, match=r"stop token '<no_such_token>' is not a token of the model '.*tiny_gemma"):
        generate_answers(model, tokenizer, PROMPTS[:1], {"max_new_tokens": 2, "stop_tokens": ["<no_such_token>"]})
    with pytest.raises(ValueError, match="must be a list of token strings"):
        generate_answers(model, tokenizer, PROMPTS[:1], {"max_new_tokens": 2, "stop_tokens": NEW_TURN})
    with pytest.raises(ValueError, match=r"stop_tokens \['<im_end>'\] of the model spec are not in the tokenizer"):
        load_tokenizer({**spec, "stop_tokens": ["<im_end>"]})


def test_a_chat_request_cannot_set_stop_tokens():
    logged = {"max_new_tokens": 8, "do_sample": False, "repetition_penalty": 1.2, "stop_tokens": [NEW_TURN]}
    with pytest.raises(MlflowException, match="unknown parameter 'stop_tokens'"):
        generation_settings(logged, {"stop_tokens": []}, ChatLimits())
    assert generation_settings(logged, {"max_new_tokens": 4}, ChatLimits())["stop_tokens"] == [NEW_TURN]
    # The request signature declares the scalar settings only.
    assert [p.name for p in generation_signature(logged).params.params] == ["max_new_tokens", "do_sample",
                                                                            "repetition_penalty"]


def test_the_chat_pyfunc_and_command_stop_at_the_saved_spec_stop_tokens(tiny, tmp_path, capsys):
    from llm_caption import chat
    from llm_caption.llm.adapters import save_finetuned
    from llm_caption.llm.pyfunc import PersianChatModel

    spec, tokenizer, _, cfg = tiny
    model = _method_model(tiny, "lora")
    question = PROMPTS[0][0]["content"]
    settings = {**chat.LOCAL_GENERATION, "max_new_tokens": 8}  # the chat command's decoding of a local method
    enc = tokenizer([tokenizer.apply_chat_template(PROMPTS[0], tokenize=False, add_generation_prompt=True)],
                    return_tensors="pt", add_special_tokens=False)
    # the same decoding through generate() itself: the penalty on other scripts is the project's logits processor
    from llm_caption.llm.generation import NonPersianPenalty, non_persian_tokens

    raw = {k: v for k, v in settings.items() if k != "non_persian_penalty"}
    raw["logits_processor"] = LogitsProcessorList([NonPersianPenalty(non_persian_tokens(tokenizer),
                                                                     settings["non_persian_penalty"])])
    with torch.no_grad():
        prompt_len = enc["input_ids"].shape[1]
        ids = model.generate(**enc, **raw, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)[0, prompt_len:].tolist()
    # A stop token the model really generates: the first token after the start that it has not generated before.
    at = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i] and ids[i] != tokenizer.eos_token_id
              and tokenizer.decode([ids[i]]).strip())
    stop = tokenizer.convert_ids_to_tokens(ids[at])
    expected = tokenizer.decode(ids[:at], skip_special_tokens=True).strip()
    assert expected and expected != tokenizer.decode(ids[:at + 1], skip_special_tokens=True).strip()

    method_cfg, _ = method_settings(cfg, "lora")
    adapter = save_finetuned(model, tmp_path / "adapters" / "lora", "lora", method_cfg, {**spec, "stop_tokens": [stop]})
    served = PersianChatModel({**settings, "max_new_tokens": 64})
    served.load_context(type("Context", (), {"artifacts": {"adapter": str(adapter)}})())
    assert served.predict(None, [question], params={"max_new_tokens": 8}) == [expected]

    assert chat.main(["--method", "lora", "--adapters-dir", str(tmp_path / "adapters"), "--max-new-tokens", "8",
                      question]) == 0
    assert capsys.readouterr().out.strip() == expected


def test_ended_rate_counts_the_answers_that_stop_before_max_new_tokens(tiny):
    _, tokenizer, model, _ = tiny
    new_turn = tokenizer.convert_tokens_to_ids(NEW_TURN)
    conversations = PROMPTS[:2]
    settings = {"max_new_tokens": 8, "do_sample": False, "stop_tokens": [NEW_TURN]}
    forced = LogitsProcessorList([ForceTokenAt(3, new_turn)])
    stopped, ended = generate_answers(model, tokenizer, conversations, {**settings, "logits_processor": forced},
                                      with_ended=True)
    assert ended == [True, True]
    cut, cut_ended = generate_answers(model, tokenizer, conversations, {**settings, "max_new_tokens": 3},
                                      with_ended=True)
    assert cut == stopped and cut_ended == [False, False]  # the same text, but cut by max_new_tokens
    # A hand-made set of answers: two of them ended on their own, one was cut.
    prompts = [{"prompt_kind": "fixed", "reference": ""}] + [{"prompt_kind": "test", "reference": r}
                                                             for r in ("سلام", "خوبم", "تهران")]
    measured = answer_metrics(prompts, ["x", "سلام", "خوبم ممنون", "تهر"], [False, True, True, False])
    assert measured["ended_rate"] == pytest.approx(2 / 3) and measured["n_test_answers"] == 3
    assert measured["answer_chars"] == pytest.approx((4 + 10 + 3) / 3) and measured["test_persian_share"] == 1.0
    assert ended_rate([]) != ended_rate([])  # NaN without answers


def test_a_logged_decoding_setting_can_only_be_repeated_by_a_request():
    logged = {"max_new_tokens": 8, "do_sample": False, "repetition_penalty": 1.2, "no_repeat_ngram_size": 4}
    assert generation_settings(logged, {"no_repeat_ngram_size": 4}, ChatLimits())["no_repeat_ngram_size"] == 4
    with pytest.raises(MlflowException, match="no_repeat_ngram_size: this model's decoding fixes it at 4, got 2"):
        generation_settings(logged, {"no_repeat_ngram_size": 2}, ChatLimits())
    with pytest.raises(MlflowException, match="unknown parameter 'top_k'"):
        generation_settings(logged, {"top_k": 2}, ChatLimits())
