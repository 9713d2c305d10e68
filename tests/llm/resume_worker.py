"""Train LoRA for a few steps with a checkpoint every step (run as a subprocess by test_resume.py).

Usage: python resume_worker.py <output_dir> ; writes <output_dir>/adapter/ and <output_dir>/result.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(output_dir: str) -> None:
    torch.set_num_threads(1)
    from chat_fixtures import load_conf
    from resume_setup import run_training

    params = load_conf("conf/base/parameters.yml")
    spec = params["llm_models"][load_conf("conf/smoke/parameters.yml")["llm_model"]]
    from llm_caption.llm.models import load_model, load_tokenizer

    result = run_training(load_model(spec), load_tokenizer(spec), spec, Path(output_dir))
    (Path(output_dir) / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
