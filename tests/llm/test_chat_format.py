import pytest

from llm_caption.llm.chat_format import IGNORE_INDEX, as_messages, first_user_turn, tokenize_conversation, tokenize_conversations
from llm_caption.llm.models import train_chat_template
from llm_fixtures import model_spec, tokenizer  # noqa: F401 (fixtures)

CONVERSATION = [
    {"role": "user", "content": "سلام، حالت چطوره؟"},
    {"role": "assistant", "content": "خوبم، ممنون! تو چطوری؟"},
    {"role": "user", "content": "من هم خوبم."},
    {"role": "assistant", "content": "خوشحالم."},
]


def test_training_template_renders_exactly_like_the_model_template(tokenizer, model_spec):
    template = train_chat_template(model_spec)
    assert "{% generation %}" in template
    assert (tokenizer.apply_chat_template(CONVERSATION, tokenize=False, chat_template=template)
            == tokenizer.apply_chat_template(CONVERSATION, tokenize=False))


def test_assistant_only_mask_labels_exactly_the_assistant_tokens(tokenizer, model_spec):
    row = tokenize_conversation(tokenizer, CONVERSATION, train_chat_template(model_spec))
    ids, labels = row["input_ids"], row["labels"]
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    labelled = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels, strict=True))
    # Exactly each assistant reply followed by its end-of-turn token, nothing of the system/user turns.
    expected = "".join(m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant")
    assert tokenizer.decode(labelled) == expected
    expected_ids = sum((tokenizer(m["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
                        for m in CONVERSATION if m["role"] == "assistant"), [])
    assert labelled == expected_ids


def test_truncation_and_conversations_without_assistant_tokens_left_are_reported(tokenizer, model_spec, caplog):
    template = train_chat_template(model_spec)
    row = tokenize_conversation(tokenizer, CONVERSATION, template, max_len=20)
    assert len(row["input_ids"]) == len(row["labels"]) == 20
    dataset = tokenize_conversations(tokenizer, [("kept", CONVERSATION), ("short", CONVERSATION)], template, max_len=64)
    assert len(dataset) == 2
    with caplog.at_level("WARNING"):
        dataset = tokenize_conversations(tokenizer, [("a", CONVERSATION)], template, max_len=200)
        with pytest.raises(ValueError, match="no conversation has an assistant token"):
            tokenize_conversations(tokenizer, [("too-long-prompt", CONVERSATION)], template, max_len=10)
    assert "too-long-prompt" in caplog.text


@pytest.mark.parametrize(("messages", "match"), [
    ([{"role": "user", "content": "سلام"}], "must end with an assistant turn"),
    ([{"role": "bot", "content": "سلام"}], "unknown role 'bot'"),
    ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}], "message 0: empty"),
    ([], "non-empty list"),
])
def test_bad_conversations_fail_naming_the_record(messages, match):
    with pytest.raises(ValueError, match=match) as error:
        as_messages(messages, "conversation c42")
    assert "conversation c42" in str(error.value)


def test_first_user_turn_is_the_prompt_and_its_reply_the_reference():
    prompt, reference = first_user_turn(CONVERSATION)
    assert prompt == CONVERSATION[:1] and reference == CONVERSATION[1]["content"]
