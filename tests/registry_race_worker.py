"""One process of the registration race in test_registry_safety: register a version, print the decision.

    python registry_race_worker.py STORE_URI MODEL_DIR METRIC READY_FILE GO_FILE SLOW_READ_S

Imports everything first, writes READY_FILE, waits for GO_FILE (so all processes register at the
same moment), then calls ``register_and_promote`` and prints the decision as one JSON line.
SLOW_READ_S > 0 makes every read of the current champion take that much longer, as on a slow or
remote store: it widens the window between reading the champion and moving the alias, so an
unserialised registration would be caught every time instead of now and then.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mlflow

from llm_caption import registry


def slow_reads(seconds: float) -> None:
    """Make ``registry.current_champion`` return ``seconds`` after it has read the alias."""
    read = registry.current_champion

    def slow(*args, **kwargs):
        holder = read(*args, **kwargs)
        time.sleep(seconds)
        return holder

    registry.current_champion = slow


def main(uri: str, model_dir: str, metric: str, ready: str, go: str, slow_read_s: str = "0") -> None:
    if float(slow_read_s) > 0:
        slow_reads(float(slow_read_s))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    Path(ready).write_text("ready")
    deadline = time.monotonic() + 120
    while not Path(go).exists():
        if time.monotonic() > deadline:
            raise SystemExit("no go signal within 120 s")
        time.sleep(0.01)
    decision = registry.register_and_promote(model_dir, "race-model", "val_bleu4", float(metric), greater_is_better=True,
                                    eval_split="split-a")
    print(json.dumps({"version": decision.version, "promoted": decision.promoted, "reason": decision.reason}))


if __name__ == "__main__":
    main(*sys.argv[1:7])
