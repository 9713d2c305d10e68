"""Project settings. See https://docs.kedro.org/en/stable/kedro_project_setup/settings.html"""

import os

from kedro.config import OmegaConfigLoader

from llm_caption.distributed import is_main_process
from llm_caption.hooks import SecondaryRankHook, TorchThreadsHook, TrackingStoreHook, TrackingVariableHook
from llm_caption.tracking import CONFIG_LOADER_ARGS as TRACKING_CONFIG_LOADER_ARGS

# No command should wait on a telemetry call to the network.
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Checks the MLflow store before kedro-mlflow's hook touches it (fails in seconds, naming the URI),
# then keeps $MLFLOW_TRACKING_URI as the user set it for the next session in the same process; runs each
# node with the torch thread count of its parameters (torch_num_threads) and restores it afterwards.
_TRACKING_STORE_HOOK = TrackingStoreHook()
HOOKS = (_TRACKING_STORE_HOOK, TrackingVariableHook(_TRACKING_STORE_HOOK), TorchThreadsHook(), SecondaryRankHook())

# Under torchrun / accelerate launch (RANK set by the launcher) only rank 0 opens the pipeline's MLflow run;
# the other ranks keep their outputs in memory (SecondaryRankHook). docs/distributed.md.
DISABLE_HOOKS_FOR_PLUGINS = () if is_main_process() else ("kedro_mlflow", "kedro-mlflow")  # the name as installed

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = TRACKING_CONFIG_LOADER_ARGS  # in tracking.py, which reads mlflow.yml outside Kedro too
