"""Runs ``run_methods`` on a tiny model in its own process (the kill-during-a-method test kills it)."""

import json
import sys

import mlflow

from chat_fixtures import chat_frames
from llm_caption.llm.experiment import run_methods
from llm_caption.llm.release import run_release

if __name__ == "__main__":
    setup = json.loads(open(sys.argv[1], encoding="utf-8").read())
    import os

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    train, test = chat_frames(12, 4)
    run_methods(train, test, setup["cfg"], setup["spec"], seed=0, release=run_release)
