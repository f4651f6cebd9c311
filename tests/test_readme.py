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
