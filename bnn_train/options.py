"""The table of every config option, built from the configs' own header comments.

The README embeds this table between markers; `python scripts/sync_readme.py` rewrites it and a
test fails when it is out of date, so the documented options are always the real ones.
"""

from __future__ import annotations

import re
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


KEY_LINE = re.compile(r"^(\s*)([A-Za-z_]\w*):\s*(\S[^#]*?)?\s*#\s*(.+)$")


def documented_keys(yaml_file: Path, group: str) -> list[tuple[str, str, str]]:
    """(key, default, comment) of every key with an inline comment: top-level keys, or the keys
    under `group:` in a global-package file."""
    out, inside = [], None
    text = yaml_file.read_text()
    global_package = "@package _global_" in text
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(("#", "-")):
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            inside = line.split(":", 1)[0].strip()
        match = KEY_LINE.match(line)
        if match is None:
            continue
        top_level = len(match.group(1)) == 0 and not global_package
        nested = len(match.group(1)) == 2 and inside == group
        if top_level or nested:
            out.append((match.group(2), (match.group(3) or "").strip(), match.group(4).strip()))
    return out


def _cell(text: str) -> str:
    return text.replace("|", chr(92) + "|")


def options_markdown(config_dir: Path) -> str:
    rows = ["| group | option | what it is |", "|---|---|---|"]
    for group in GROUPS:
        for f in sorted((config_dir / group).glob("*.yaml")):
            rows.append(f"| `{group}` | `{f.stem}` | {_cell(describe(f))} |")
    rows += ["", "Every documented key (set with `group.key=value`; options that share a key are listed together):", "",
             "| key | options | default | what it does |", "|---|---|---|---|"]
    for key, default, comment in documented_keys(config_dir / "train.yaml", ""):
        rows.append(f"| `{key}` | (top level) | `{_cell(default)}` | {_cell(comment)} |")
    for group in GROUPS:
        seen: dict[tuple[str, str], list[list[str]]] = {}
        for f in sorted((config_dir / group).glob("*.yaml")):
            for key, default, comment in documented_keys(f, group):
                entry = seen.setdefault((key, comment), [])
                entry.append([f.stem, default])
        for (key, comment), entries in seen.items():
            options = ", ".join(stem for stem, _ in entries)
            defaults = sorted({d for _, d in entries})
            rows.append(f"| `{group}.{key}` | {options} | {_cell(' / '.join(f'`{d}`' for d in defaults))} | {_cell(comment)} |")
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
