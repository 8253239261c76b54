"""Every paper recipe composes and runs each of its stages on a tiny budget."""

import json
from pathlib import Path

import pytest
from PIL import Image

from bnn_train.config import validate
from bnn_train.train import stages
from conftest import CONFIG_DIR, compose_cfg

RECIPES = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
TINY = ["trainer.epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.progress=false"]


def tiny_image_folder(root: Path, size: int = 72) -> Path:
    for split in ("train", "test"):
        for c in range(2):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (size, size + 8), (40 * i, 120 * c, 60)).save(d / f"{i}.png")
    return root


def tiny_data(recipe: str, tmp_path: Path) -> list[str]:
    if recipe.endswith("imagenet"):
        return [f"data.root={tiny_image_folder(tmp_path / 'images')}", "data.batch_size=2", "data.num_workers=0"]
    if recipe.endswith("mnist"):
        return ["data=synthetic", "data.channels=1", "data.image_size=28", "data.batch_size=16"]
    return ["data=synthetic", "data.image_size=32", "data.batch_size=8"]


def test_every_recipe_states_its_published_figure():
    for recipe in RECIPES:
        text = (CONFIG_DIR / "experiment" / f"{recipe}.yaml").read_text()
        assert "Published" in text or "Reference" in text, recipe
        assert "Reached here" in text or "Not run here" in text, recipe


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_every_stage_on_a_tiny_budget(recipe, tmp_path):
    cfg = compose_cfg(f"experiment={recipe}", *tiny_data(recipe, tmp_path), *TINY)
    if cfg.pretrain.name != "none":
        cfg.pretrain.epochs = 1
    validate(cfg)
    metrics = stages.run(cfg, tmp_path / "run", {"experiment": recipe})
    assert metrics["status"] == "completed"
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    if cfg.pretrain.name != "none":
        assert set(saved["stages"]) == {"stage1", "stage2"}
        assert (tmp_path / "run" / "stage1" / "checkpoints" / "last.pt").is_file()
        assert (tmp_path / "run" / "stage2" / "checkpoints" / "last.pt").is_file()
