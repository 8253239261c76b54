"""Data-parallel training: 2 CPU processes (gloo) train the same recipe as one process."""

import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from bnn_train.data import build_data
from conftest import REPO

# No BatchNorm (PyTorch has no CPU SyncBatchNorm): depth 0 is a linear classifier, so one process
# on the global batch and two on its halves compute the same averaged gradient.
RECIPE = ["data=synthetic", "model=mlp", "model.depth=0", "model.final_bn=false", "method=bnn",
          "optim=sgd", "optim.lr=0.1", "optim.weight_decay=0", "sched=constant", "trainer.epochs=2",
          "trainer.progress=false", "data.batch_size=64"]


def test_shards_partition_every_global_batch():
    cfg = OmegaConf.create({"name": "synthetic", "root": "data", "batch_size": 8, "num_workers": 0,
                            "download": False, "augment": True, "num_classes": 3, "channels": 1,
                            "image_size": 8, "train_size": 32, "val_size": 8, "noise": 0.5})
    whole = build_data(cfg, seed=1)
    halves = [build_data(cfg, seed=1) for _ in range(2)]
    for rank, bundle in enumerate(halves):
        bundle.train.shard(rank, 2)
    for (x, y), (x0, y0), (x1, y1) in zip(whole.train, halves[0].train, halves[1].train):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def _train(tmp_path, name, launcher):
    out = tmp_path / name
    cmd = [*launcher, str(REPO / "train.py"), *RECIPE, f"hydra.run.dir={out}"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)


def test_two_gloo_processes_match_one_process(tmp_path):
    single = _train(tmp_path, "single", [sys.executable])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ddp = _train(tmp_path, "ddp", torchrun)
    for key, value in single["model"].items():
        assert torch.allclose(value, ddp["model"][key], atol=1e-5), key
    assert ddp["progress"]["history"][-1]["val_acc"] == pytest.approx(single["progress"]["history"][-1]["val_acc"])
    assert not any(k.startswith("module.") for k in ddp["model"])  # checkpoints are interchangeable
