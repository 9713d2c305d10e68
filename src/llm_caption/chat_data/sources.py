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
with the reason and the line / record number. Only a missing source raises here.
"""

from __future__ import annotations

import importlib.util
import json
import logging
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
            conversations = yaml.load(path.read_text(encoding="utf-8"), Loader=safe_loader)["conversations"]
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


def _read_jsonl(path: Path, source: str, parser: Callable, roles: Mapping[str, str] | None) -> list[ChatRecord]:
    """One record per line; every line (blank, undecodable or malformed included) becomes a record."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    records = []
    for number, raw_bytes in enumerate(lines, start=1):
        raw_bytes = raw_bytes.removesuffix(b"\r")
        try:
            text = raw_bytes.decode("utf-8")
        except UnicodeDecodeError as err:
            records.append(ChatRecord(source, number, raw_bytes.decode("utf-8", "backslashreplace"),
                                      reason="invalid_utf8",
                                      detail=f"byte {err.start} ({raw_bytes[err.start:err.start + 1]!r}): {err.reason}"))
            continue
        if not text.strip():
            records.append(ChatRecord(source, number, text, reason="empty_record", detail="blank line"))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            records.append(ChatRecord(source, number, text, reason="malformed_json",
                                      detail=f"column {err.colno}: {err.msg}"))
            continue
        records.append(_parsed(source, number, text, obj, parser, roles))
    return records


def _read_json(path: Path, source: str, parser: Callable, roles: Mapping[str, str] | None) -> list[ChatRecord]:
    """A JSON list of records (record number = position, 1-based); a file that does not parse is one rejected record."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
        obj = json.loads(text)
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raw = data.decode("utf-8", "backslashreplace")
        return [ChatRecord(source, line, raw[:MAX_RAW_CHARS], reason="invalid_utf8",
                           detail=f"the whole file is unreadable: byte {err.start} on line {line}: {err.reason}")]
    except json.JSONDecodeError as err:
        return [ChatRecord(source, err.lineno, text[:MAX_RAW_CHARS], reason="malformed_json",
                           detail=f"the whole file is unreadable: line {err.lineno} column {err.colno}: {err.msg}")]
    if not isinstance(obj, list):
        raise ValueError(f"{path}: a .json chat file must hold a list of records, got {type(obj).__name__}")
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
    for i, spec in enumerate(sources):
        where = f"{param_name}[{i}]"
        kind = spec.get("type")
        if kind not in SOURCE_READERS:
            raise ValueError(f"Parameter {where}.type={kind!r}; expected one of {sorted(SOURCE_READERS)}")
        found = SOURCE_READERS[kind](spec, where, sharegpt_roles)
        logger.info("Read %d chat records from %s source %s", len(found), kind, where)
        records.extend(found)
    return records


def count_by_source(records: Iterable[ChatRecord]) -> dict[str, int]:
    """Number of records per source."""
    counts: dict[str, int] = {}
    for r in records:
        counts[r.source] = counts.get(r.source, 0) + 1
    return counts
