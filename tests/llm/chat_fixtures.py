"""Small real Persian chat splits built from chatterbot-corpus (docs/datasets.md schema), for tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


def load_conf(path: str) -> dict:
    """A YAML file of the project's conf/, e.g. ``conf/base/parameters.yml``."""
    return yaml.safe_load((REPO_ROOT / path).read_text(encoding="utf-8"))


def persian_conversations(limit: int) -> list[list[dict[str, str]]]:
    """Up to ``limit`` user/assistant pairs from chatterbot-corpus's Persian files, in a fixed order."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "persian"
    conversations = []
    for path in sorted(folder.glob("*.yml")):
        for chain in yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]:
            turns = [str(t).strip() for t in chain if str(t).strip()]
            for i in range(0, len(turns) - 1, 2):
                conversations.append([{"role": "user", "content": turns[i]},
                                      {"role": "assistant", "content": turns[i + 1]}])
                if len(conversations) >= limit:
                    return conversations
    return conversations


def chat_frames(n_train: int = 24, n_test: int = 8) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(chat_train, chat_test) with the columns of docs/datasets.md."""
    conversations = persian_conversations(n_train + n_test)
    rows = [{"conversation_id": f"c{i:04d}", "source": "chatterbot:persian", "messages": m,
             "n_tokens": sum(len(t["content"]) for t in m)} for i, m in enumerate(conversations)]
    frame = pd.DataFrame(rows)
    return frame.iloc[:n_train].reset_index(drop=True), frame.iloc[n_train:].reset_index(drop=True)


def write_chat_splits(project: Path, n_train: int = 24, n_test: int = 8) -> None:
    """Write the splits where the catalog's chat_train / chat_test read them."""
    train, test = chat_frames(n_train, n_test)
    out = project / "data" / "05_model_input"
    out.mkdir(parents=True, exist_ok=True)
    train.to_parquet(out / "chat_train.parquet")
    test.to_parquet(out / "chat_test.parquet")
