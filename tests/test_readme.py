"""The README front page: short, and every link in it leads to a file in the repository."""

from __future__ import annotations

import re

from conftest import REPO


def test_the_front_page_is_short_and_its_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 220
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not link.startswith(("http://", "https://", "mailto:"))]
    assert local, "the front page links to its docs pages"
    missing = [link for link in local if not (REPO / link).exists()]
    assert missing == [], missing
    for page in sorted((REPO / "docs").glob("*.md")):  # and the pages' own links to files
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not link.startswith(("http://", "https://")):
                assert (page.parent / link).exists() or (REPO / link).exists(), (page.name, link)


def test_every_command_is_in_the_readme_s_table_and_has_help():
    """As sqlite-utils checks its docs: a new command cannot ship without its row and its help."""
    from click.testing import CliRunner

    from hpo.cli import cli

    rows = set(re.findall(r"^\| `hpo ([a-z-]+)", (REPO / "README.md").read_text(), re.MULTILINE))
    assert rows == set(cli.commands), (
        f"in the CLI only: {set(cli.commands) - rows}; in the README only: {rows - set(cli.commands)}"
    )
    for name, command in cli.commands.items():
        assert command.help and command.help.strip(), f"`hpo {name}` has no help text"
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0 and f"{name} [OPTIONS]" in result.output, result.output
