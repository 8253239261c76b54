import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
SHARED_DATA = REPO.parent / "shared" / "data"


def compose_cfg(*overrides: str):
    """The config train.py would see for these command-line overrides."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.fixture(autouse=True)
def _no_user_data_root(monkeypatch):
    # Tests choose their data roots explicitly.
    monkeypatch.delenv("BNN_DATA_ROOT", raising=False)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
