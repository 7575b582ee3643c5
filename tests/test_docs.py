"""The documentation cannot rot: the site builds strictly (a broken link between pages, a missing anchor or a page
left out of the navigation fails), generated pages are what the code generates, and the README stays a short
front page whose links lead somewhere."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO


def test_the_docs_site_builds_strictly(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "stages" / "ppo" / "index.html").is_file()


def test_the_configuration_reference_is_generated_from_the_schema():
    from rlhf_core import reference

    assert reference.PAGE.read_text() == reference.render(), "run `make generated` and commit the result"


def test_the_readme_is_a_short_front_page_whose_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert links, "the README links into the docs"
    for link in links:
        assert (REPO / link).exists(), f"README links to {link}, which does not exist"
