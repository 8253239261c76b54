"""The README's option table is the one the configs describe, and every option is described."""

from bnn_train.options import END, GROUPS, START, options_markdown
from conftest import CONFIG_DIR, REPO


def test_readme_option_table_is_in_sync():
    readme = (REPO / "README.md").read_text()
    table = readme.split(START, 1)[1].split(END, 1)[0].strip()
    assert table == options_markdown(CONFIG_DIR), "run: python scripts/sync_readme.py"


def test_every_option_has_a_description():
    rows = options_markdown(CONFIG_DIR).splitlines()[2:]
    assert rows
    for row in rows:
        assert not row.rstrip().endswith("|  |"), row


def test_groups_are_folders():
    assert sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir()) == sorted(GROUPS)
