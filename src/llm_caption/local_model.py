"""Model folders of this project read without MLflow and without unpickling.

A registered model in a local store is a folder holding ``MLmodel``, the pickled python model and its
artifacts. The command-line tools build the model from the artifacts themselves (the pickle is read as
opcodes, never run) when the folder holds exactly what this project logged; anything else is left to
``mlflow.pyfunc.load_model`` and its own checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Collection


class LocalContext:
    """What a python model's ``load_context`` reads: the artifact paths, by name."""

    def __init__(self, artifacts: dict[str, str]) -> None:
        self.artifacts = artifacts


def read_pyfunc_folder(folder: str | Path, module: str, class_name: str, artifact_names: Collection[str],
                       optional_names: Collection[str] = ()) -> tuple[dict[str, Any], dict[str, str]] | None:
    """``(MLmodel metadata, artifact paths by name)`` of the model folder ``folder`` when it holds a python model
    pickled as ``module.class_name`` (loaded by ``mlflow.pyfunc.model``, no ``code`` to import) with exactly the
    artifacts ``artifact_names`` (and any of ``optional_names``), every path inside the folder. None otherwise (another kind of model, an
    unreadable or partial folder, a path leading out of the folder)."""
    import pickletools

    import yaml

    folder = Path(folder)
    root = folder.resolve()
    try:
        meta = yaml.safe_load((folder / "MLmodel").read_text(encoding="utf-8")) or {}
        flavor = meta["flavors"]["python_function"]
        pickled = folder / flavor["python_model"]
        artifacts = {str(name): str(folder / spec["path"]) for name, spec in (flavor.get("artifacts") or {}).items()}
        if not all(path.resolve().is_relative_to(root) for path in [pickled, *map(Path, artifacts.values())]):
            return None  # a path leading out of the model's folder: left to MLflow's own checks
        strings = [arg for _, arg, _ in pickletools.genops(pickled.read_bytes()) if isinstance(arg, str)]
    except (OSError, KeyError, TypeError, ValueError, AttributeError, yaml.YAMLError):
        return None
    if (flavor.get("loader_module") != "mlflow.pyfunc.model" or flavor.get("code")
            or strings[:2] != [module, class_name]
            or not set(artifact_names) <= set(artifacts) <= set(artifact_names) | set(optional_names)):
        return None
    return meta, artifacts
