"""Record formats: how one parsed record becomes a list of ``{"role", "content"}`` messages.

* ``openai``   -- ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
* ``sharegpt`` -- ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}``
  (the role names map through ``chat_data.sharegpt_roles``)
* ``chain``    -- a bare list of utterances (chatterbot-corpus): turns alternate user, assistant, ...

``auto`` picks ``openai`` or ``sharegpt`` by the key the record has. Parsers raise
:class:`RecordError` with a reason from :data:`llm_caption.chat_data.records.REASONS`.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Callable, Mapping
from typing import Any

ROLES = ("system", "user", "assistant")

_SURROGATE = re.compile("[\ud800-\udfff]")
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 60, 60


def short_repr(value: Any) -> str:
    """A bounded ``repr`` for error details: a few levels and characters deep, whatever the value's size or depth."""
    return _SHORT.repr(value)


class RecordError(ValueError):
    """A record that cannot become a conversation; ``reason`` is one of ``records.REASONS``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _messages_from(items: Any, key: str, role_key: str, content_key: str,
                   role_map: Mapping[str, str]) -> list[dict[str, str]]:
    if not isinstance(items, list):
        raise RecordError("bad_messages", f"`{key}` is {type(items).__name__}, expected a list")
    messages = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise RecordError("bad_messages", f"`{key}[{i}]` is {type(item).__name__}, expected an object")
        if role_key not in item or content_key not in item:
            raise RecordError("bad_messages", f"`{key}[{i}]` lacks `{role_key}` or `{content_key}`")
        role, content = item[role_key], item[content_key]
        if not isinstance(role, str) or role not in role_map:
            raise RecordError("unknown_role", f"`{key}[{i}].{role_key}` is {short_repr(role)}; "
                                              f"expected one of {sorted(role_map)}")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise RecordError("bad_messages", f"`{key}[{i}].{content_key}` is {type(content).__name__}, expected text")
        _require_characters(content, f"`{key}[{i}].{content_key}`")
        messages.append({"role": role_map[role], "content": content})
    return messages


def parse_openai(record: Any, sharegpt_roles: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """Messages of an OpenAI-format record."""
    _require_object(record)
    if "messages" not in record:
        raise RecordError("missing_messages", f"no `messages` key (keys: {_keys(record)})")
    return _messages_from(record["messages"], "messages", "role", "content", {r: r for r in ROLES})


def parse_sharegpt(record: Any, sharegpt_roles: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """Messages of a ShareGPT-format record; ``sharegpt_roles`` maps ``from`` values to roles."""
    _require_object(record)
    if "conversations" not in record:
        raise RecordError("missing_messages", f"no `conversations` key (keys: {_keys(record)})")
    role_map = dict(sharegpt_roles or {"system": "system", "human": "user", "gpt": "assistant"})
    bad = {k: v for k, v in role_map.items() if v not in ROLES}
    if bad:
        raise ValueError(f"chat_data.sharegpt_roles maps to unknown roles {bad}; roles are {ROLES}")
    return _messages_from(record["conversations"], "conversations", "from", "value", role_map)


def parse_auto(record: Any, sharegpt_roles: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """``openai`` when the record has ``messages``, ``sharegpt`` when it has ``conversations``."""
    _require_object(record)
    if "messages" in record:
        return parse_openai(record, sharegpt_roles)
    if "conversations" in record:
        return parse_sharegpt(record, sharegpt_roles)
    raise RecordError("missing_messages",
                      f"neither `messages` nor `conversations` key (keys: {_keys(record)})")


def parse_chain(record: Any, sharegpt_roles: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """A list of utterances -> alternating user/assistant messages, starting with the user."""
    if not isinstance(record, list):
        raise RecordError("bad_messages", f"a conversation chain must be a list, got {type(record).__name__}")
    messages = []
    for i, turn in enumerate(record):
        if not isinstance(turn, str):
            raise RecordError("bad_messages", f"turn {i} is {type(turn).__name__}, expected text")
        _require_characters(turn, f"turn {i}")
        messages.append({"role": ("user", "assistant")[i % 2], "content": turn})
    return messages


def _require_characters(text: str, where: str) -> None:
    """Reject text holding an unpaired surrogate (JSON's ``"\\ud800"`` escape): it is no character and cannot be
    written as UTF-8, so it would fail every later step that saves or tokenizes the text."""
    surrogate = _SURROGATE.search(text)
    if surrogate:
        raise RecordError("invalid_unicode", f"{where} holds the unpaired surrogate U+{ord(surrogate.group()):04X} "
                                             f"at character {surrogate.start()}")


def _keys(record: Mapping) -> list[str]:
    """The first ten keys of ``record``, sorted and shortened, to name them in a reason's detail."""
    return [short_repr(k) if not isinstance(k, str) else k[:60] for k in sorted(record, key=str)[:10]]


def _require_object(record: Any) -> None:
    if not isinstance(record, Mapping):
        raise RecordError("not_an_object", f"expected a JSON object, got {type(record).__name__}")


#: Format name -> parser(record, sharegpt_roles) -> messages.
FORMAT_PARSERS: dict[str, Callable[..., list[dict[str, str]]]] = {
    "auto": parse_auto,
    "openai": parse_openai,
    "sharegpt": parse_sharegpt,
    "chain": parse_chain,
}


def get_parser(name: str) -> Callable[..., list[dict[str, str]]]:
    """The parser registered as ``name``; a clear error for an unknown format."""
    try:
        return FORMAT_PARSERS[name]
    except KeyError:
        raise ValueError(f"Unknown chat record format {name!r}; expected one of {sorted(FORMAT_PARSERS)}") from None
