"""Chat data sources: where conversations come from, chosen by ``chat_data.sources`` in the parameters.

Each entry of ``chat_data.sources`` has a ``type`` from :data:`SOURCE_READERS`:

``chatterbot``
    The Persian files of the ``chatterbot-corpus`` package (the embedded default): each
    ``conversations`` entry is a chain of utterances, read as alternating user/assistant turns.
    A chain of odd length ends with a user turn; ``odd_chain: drop_last_turn`` (default) drops
    that turn and counts it in the report, ``odd_chain: keep`` leaves it for validation to reject.
``file``
    A local file (``path``, relative to the working directory, i.e. the project root) in
    OpenAI or ShareGPT format (``format: auto|openai|sharegpt``): ``.jsonl`` (one record a line),
    ``.json`` (a list of records) or ``.parquet`` (one record a row).
``hub``
    A dataset on the Hugging Face hub (``dataset_id``, optional ``name``, ``split``,
    ``revision``, ``max_records``), loaded with ``datasets.load_dataset``. Needs hub access.

Readers return one :class:`ChatRecord` per input record: parsed (``messages`` set) or rejected
with the reason and the line / record number; no content of a file makes a reader raise (bad bytes,
bad JSON, nesting too deep, a BOM, any line ending). A source with no records is logged as a
warning naming it. Only a missing or unusable source (and no records from all sources together)
raises here.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import logging
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .formats import RecordError, get_parser
from .records import ChatRecord

logger = logging.getLogger(__name__)

#: Longest raw text kept in a rejected record for a whole-file failure (a ``.json`` that does not parse).
MAX_RAW_CHARS = 10_000


def _parsed(source: str, line: int, raw: Any, obj: Any, parser: Callable, roles: Mapping[str, str] | None) -> ChatRecord:
    """A record whose object is ``obj``: parsed into messages, or rejected with the parser's reason."""
    try:
        messages = parser(obj, roles)
    except RecordError as err:
        return ChatRecord(source, line, raw, reason=err.reason, detail=err.detail)
    return ChatRecord(source, line, raw, messages=tuple(messages))


def _require_path(spec: Mapping[str, Any], key: str, where: str) -> Path:
    if not spec.get(key):
        raise ValueError(f"Parameter {where}.{key} is required for a source of type {spec.get('type')!r}")
    path = Path(spec[key]).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Chat source {str(path)!r} does not exist (resolved to {path.resolve()}); "
                                f"it is set by parameter {where}.{key}")
    return path


# --------------------------------------------------------------------------- chatterbot-corpus


def _package_dir(package: str, where: str) -> Path:
    """Directory of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Package {package!r} (parameter {where}.package) is not installed; "
                                f"install it with `pip install {package.replace('_', '-')}`")
    return Path(list(spec.submodule_search_locations)[0])


def read_chatterbot(spec: Mapping[str, Any], where: str, sharegpt_roles: Mapping[str, str] | None = None) -> list[ChatRecord]:
    """Every conversation of ``chatterbot_corpus/data/<language>/*.yml`` as alternating user/assistant turns."""
    import yaml

    language = spec.get("language", "persian")
    directory = _package_dir(spec.get("package", "chatterbot_corpus"), where) / "data" / language
    if not directory.is_dir():
        raise FileNotFoundError(f"Chatterbot corpus folder {directory} does not exist; "
                                f"the language is set by parameter {where}.language={language!r}")
    odd_chain = spec.get("odd_chain", "drop_last_turn")
    if odd_chain not in ("drop_last_turn", "keep"):
        raise ValueError(f"Parameter {where}.odd_chain={odd_chain!r}; expected drop_last_turn or keep")
    parser = get_parser("chain")
    safe_loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's safe loader when available: ~10x faster
    records: list[ChatRecord] = []
    for path in sorted(directory.glob(spec.get("files", "*.yml"))):
        source = f"chatterbot_corpus/data/{language}/{path.name}"
        try:
            conversations = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=safe_loader)["conversations"]
        except (yaml.YAMLError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a chatterbot corpus file with a `conversations` list ({err})") from err
        for index, chain in enumerate(conversations, start=1):
            record = _parsed(source, index, chain, chain, parser, sharegpt_roles)
            if record.messages and odd_chain == "drop_last_turn" and len(record.messages) % 2 == 1 and len(record.messages) > 1:
                record = ChatRecord(source, index, chain, messages=record.messages[:-1],
                                    notes={"trailing_user_turns_dropped": 1})
            records.append(record)
    if not records:
        raise FileNotFoundError(f"No conversations found under {directory} (parameter {where})")
    trimmed = sum(r.notes.get("trailing_user_turns_dropped", 0) for r in records)
    if trimmed:
        logger.info("Dropped the trailing user turn of %d odd-length chains (%s.odd_chain=drop_last_turn)",
                    trimmed, where)
    return records


# --------------------------------------------------------------------------- local files


def _decode_json(text: str) -> tuple[Any, tuple[str, str, int] | None]:
    """``(object, None)``, or ``(None, (reason, detail, line))`` when ``text`` is not JSON this reader can hold.

    Besides malformed JSON, Python's parser raises ``RecursionError`` for deeply nested arrays/objects
    and a plain ``ValueError`` for an integer longer than ``sys.get_int_max_str_digits()``; each of these
    becomes a reason, so no input line can stop the read.
    """
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        return None, ("malformed_json", f"line {err.lineno} column {err.colno}: {err.msg}", err.lineno)
    except RecursionError:
        return None, ("too_deeply_nested", "arrays/objects nest deeper than Python's JSON parser can follow "
                                           f"(recursion limit {sys.getrecursionlimit()})", 1)
    except ValueError as err:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        return None, ("malformed_json", str(err), 1)


def _json_type(value: Any) -> str:
    """JSON's name for the type of a decoded value (object, array, string, number, boolean, null)."""
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# The whitespace JSON allows between tokens (RFC 8259). str.strip() would also take "\x1c", "\x0b" or a
# no-break space, which JSON rejects: a line or file of those is malformed JSON, not blank.
JSON_WHITESPACE = " \t\n\r"


def _jsonl_record(source: str, number: int, raw_bytes: bytes, parser: Callable,
                  roles: Mapping[str, str] | None) -> ChatRecord:
    """The record of one JSONL line: parsed, or rejected with the reason."""
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as err:
        return ChatRecord(source, number, raw_bytes.decode("utf-8", "backslashreplace"), reason="invalid_utf8",
                          detail=f"byte {err.start} ({raw_bytes[err.start:err.start + 1]!r}): {err.reason}")
    if not text.strip(JSON_WHITESPACE):
        return ChatRecord(source, number, text, reason="empty_record", detail="blank line")
    obj, error = _decode_json(text)
    if error:
        reason, detail, _ = error
        return ChatRecord(source, number, text, reason=reason, detail=detail.removeprefix("line 1 "))
    return _parsed(source, number, text, obj, parser, roles)


def _read_jsonl(path: Path, source: str, parser: Callable, roles: Mapping[str, str] | None) -> list[ChatRecord]:
    """One record per line; every line (blank, undecodable or malformed included) becomes a record.

    Lines end at ``\\n``, ``\\r\\n`` or a lone ``\\r`` (JSON text holds none of these unescaped, so no
    record is split); a UTF-8 byte-order mark at the start of the file is skipped.
    """
    lines = path.read_bytes().removeprefix(codecs.BOM_UTF8).splitlines()
    return [_jsonl_record(source, number, raw, parser, roles) for number, raw in enumerate(lines, start=1)]


def _whole_file_rejected(source: str, line: int, raw: str, reason: str, detail: str) -> list[ChatRecord]:
    """A ``.json`` file that cannot be read as records, as one rejected record (so it is counted and written)."""
    return [ChatRecord(source, line, raw[:MAX_RAW_CHARS], reason=reason,
                       detail=f"the whole file is unreadable: {detail}")]


def _read_json(path: Path, source: str, parser: Callable, roles: Mapping[str, str] | None) -> list[ChatRecord]:
    """A JSON list of records (record number = position, 1-based).

    A UTF-8 byte-order mark is skipped; an empty file, or one of JSON whitespace only (space, tab, CR, LF),
    holds no records. A file that does not decode, does not parse or whose top level is not a list is one
    rejected record naming why.
    """
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        return _whole_file_rejected(source, line, data.decode("utf-8", "backslashreplace"), "invalid_utf8",
                                    f"byte {err.start} on line {line}: {err.reason}")
    if not text.strip(JSON_WHITESPACE):
        return []
    obj, error = _decode_json(text)
    if error:
        reason, detail, line = error
        return _whole_file_rejected(source, line, text, reason, detail)
    if not isinstance(obj, list):
        return _whole_file_rejected(source, 1, text, "not_a_list",
                                    f"the top level is a JSON {_json_type(obj)}; a .json chat file holds a list "
                                    "of records (or use .jsonl, one record a line)")
    return [_parsed(source, i, item, item, parser, roles) for i, item in enumerate(obj, start=1)]


def _read_parquet(path: Path, source: str, parser: Callable, roles: Mapping[str, str] | None) -> list[ChatRecord]:
    """One record per row (record number = row, 1-based)."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise ValueError(f"{path}: not a readable parquet file ({err})") from err
    return [_parsed(source, i, row, row, parser, roles) for i, row in enumerate(rows, start=1)]


#: File suffix -> reader.
FILE_READERS: dict[str, Callable[..., list[ChatRecord]]] = {
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
}


def read_file(spec: Mapping[str, Any], where: str, sharegpt_roles: Mapping[str, str] | None = None) -> list[ChatRecord]:
    """Records of a local JSONL / JSON / parquet file in OpenAI or ShareGPT format."""
    path = _require_path(spec, "path", where)
    reader = FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"Chat source {path} ({where}.path): unsupported file type {path.suffix!r}; "
                         f"expected one of {sorted(FILE_READERS)}")
    return reader(path, str(spec["path"]), get_parser(spec.get("format", "auto")), sharegpt_roles)


# --------------------------------------------------------------------------- Hugging Face hub


def read_hub(spec: Mapping[str, Any], where: str, sharegpt_roles: Mapping[str, str] | None = None) -> list[ChatRecord]:
    """Records of a hub dataset split (``datasets.load_dataset``); needs network access to the hub."""
    from datasets import load_dataset

    dataset_id = spec.get("dataset_id")
    if not dataset_id:
        raise ValueError(f"Parameter {where}.dataset_id is required for a source of type 'hub'")
    split = spec.get("split", "train")
    max_records = spec.get("max_records")
    if max_records:
        split = f"{split}[:{int(max_records)}]"
    try:
        dataset = load_dataset(dataset_id, name=spec.get("name"), split=split, revision=spec.get("revision"))
    except Exception as err:  # offline, unknown id, gated dataset, ...
        raise RuntimeError(f"Could not load hub dataset {dataset_id!r} split {split!r} "
                           f"(parameter {where}.dataset_id): {err}") from err
    source = f"hf://{dataset_id}/{split}"
    parser = get_parser(spec.get("format", "auto"))
    return [_parsed(source, i, dict(row), dict(row), parser, sharegpt_roles) for i, row in enumerate(dataset, start=1)]


#: Source type -> reader(spec, where, sharegpt_roles) -> records.
SOURCE_READERS: dict[str, Callable[..., list[ChatRecord]]] = {
    "chatterbot": read_chatterbot,
    "file": read_file,
    "hub": read_hub,
}


def read_sources(sources: Sequence[Mapping[str, Any]], sharegpt_roles: Mapping[str, str] | None = None,
                 param_name: str = "chat_data.sources") -> list[ChatRecord]:
    """All records of all ``sources``, in order. Raises for an unknown type or a missing path."""
    if not sources:
        raise ValueError(f"Parameter {param_name} is empty: name at least one chat source")
    records: list[ChatRecord] = []
    names = []
    for i, spec in enumerate(sources):
        where = f"{param_name}[{i}]"
        kind = spec.get("type")
        if kind not in SOURCE_READERS:
            raise ValueError(f"Parameter {where}.type={kind!r}; expected one of {sorted(SOURCE_READERS)}")
        found = SOURCE_READERS[kind](spec, where, sharegpt_roles)
        name = _source_name(spec)
        names.append(name)
        if found:
            logger.info("Read %d chat records from %s source %s (%s)", len(found), kind, where, name)
        else:
            logger.warning("Chat source %s (%s) is empty: no records read from it", name, where)
        records.extend(found)
    if not records:
        raise ValueError(f"No chat records in any source of parameter {param_name}: every one is empty "
                         f"({', '.join(names)})")
    return records


def _source_name(spec: Mapping[str, Any]) -> str:
    """What a source is called in messages: its file, hub dataset or corpus language."""
    return str(spec.get("path") or spec.get("dataset_id") or f"chatterbot corpus {spec.get('language', 'persian')!r}")


def count_by_source(records: Iterable[ChatRecord]) -> dict[str, int]:
    """Number of records per source."""
    counts: dict[str, int] = {}
    for r in records:
        counts[r.source] = counts.get(r.source, 0) + 1
    return counts
