"""The table of every config option, built from the configs' own header comments.

The README embeds this table between markers; `python scripts/sync_readme.py` rewrites it and a
test fails when it is out of date, so the documented options are always the real ones.
"""

from __future__ import annotations

from pathlib import Path

GROUPS = ["model", "method", "ste", "data", "optim", "sched", "pretrain", "teacher", "trainer", "experiment"]
START, END = "<!-- options:start -->", "<!-- options:end -->"


def describe(yaml_file: Path) -> str:
    """The first paragraph of a config file's leading comment, joined into one line."""
    lines = []
    for line in yaml_file.read_text().splitlines():
        text = line.lstrip("#").strip()
        if text.startswith("@package"):
            continue
        if not line.startswith("#") or (not text and lines):
            break
        lines.append(text)
    return " ".join(lines)


def options_markdown(config_dir: Path) -> str:
    rows = ["| group | option | what it is |", "|---|---|---|"]
    for group in GROUPS:
        for f in sorted((config_dir / group).glob("*.yaml")):
            rows.append(f"| `{group}` | `{f.stem}` | {describe(f).replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def sync_readme(readme: Path, config_dir: Path) -> bool:
    """Rewrite the table between the markers; True when the file changed."""
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{options_markdown(config_dir)}\n{END}{tail}"
    if new != text:
        readme.write_text(new)
    return new != text
