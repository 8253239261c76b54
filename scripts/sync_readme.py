"""Rewrite the README's option table from configs/ (run after adding or documenting an option)."""

from pathlib import Path

from bnn_train.options import sync_readme

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    changed = sync_readme(ROOT / "README.md", ROOT / "configs")
    print("README.md updated" if changed else "README.md already in sync")
