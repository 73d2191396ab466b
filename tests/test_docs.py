"""The README and docs/ pages: links resolve, and the README's two commands are what CI runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _links(page: Path) -> list[str]:
    """Targets of the markdown links of a page, outside code blocks."""
    return LINK.findall(FENCE.sub("", page.read_text()))


def _is_relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target) and not target.startswith("#")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), re.M)
    return {_anchor(h) for h in headings}


def test_docs_pages_exist_and_readme_links_each():
    assert len(PAGES) > 1, "docs/ holds no pages"
    linked = {(ROOT / t.split("#")[0]).resolve() for t in _links(ROOT / "README.md") if _is_relative(t)}
    assert set(PAGES[1:]) <= linked, f"docs pages the README does not link: {sorted(set(PAGES[1:]) - linked)}"


def test_every_relative_link_points_to_an_existing_file():
    broken = []
    for page in PAGES:
        for target in filter(_is_relative, _links(page)):
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, f"links to missing files: {broken}"


def test_every_link_to_a_heading_names_an_existing_heading():
    broken = []
    for page in PAGES:
        for target in _links(page):
            if "#" not in target or not (_is_relative(target) or target.startswith("#")):
                continue
            file, anchor = target.split("#", 1)
            linked = (page.parent / file).resolve() if file else page
            if linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, f"links to missing headings: {broken}"


def _readme_two_commands() -> list[str]:
    """The bash blocks of the README's "Two commands" section: the setup command, then the test command."""
    section = re.search(r"^## Two commands\n(.*?)^## ", (ROOT / "README.md").read_text(), re.S | re.M)
    assert section, 'README has no "## Two commands" section'
    blocks = re.findall(r"^```bash\n(.*?)^```", section.group(1), re.S | re.M)
    assert len(blocks) == 2, f"expected two bash blocks in Two commands, found {len(blocks)}"
    return [block.strip() for block in blocks]


def _ci_commands() -> list[list[str]]:
    """The commands .ci/run runs, as argument lists without pip's -q (quiet output changes nothing)."""
    commands = []
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        line = line.strip()
        if line.startswith((".venv/", "python3 -m venv")):
            commands.append([arg for arg in shlex.split(line) if arg != "-q"])
    return commands


def test_readme_setup_command_is_the_one_ci_runs_then_the_quickstart():
    setup, _ = _readme_two_commands()
    steps = [shlex.split(step) for step in setup.split("&&")]
    assert steps[-1] == [".venv/bin/emu2", "quickstart"]
    ci = _ci_commands()
    assert steps[:-1] == ci[: len(steps) - 1], f"README sets up with {steps[:-1]}, .ci/run with {ci}"


def test_readme_test_command_is_the_one_ci_runs():
    _, test = _readme_two_commands()
    assert shlex.split(test) == [".venv/bin/python", "-m", "pytest"]
    assert _ci_commands()[-1] == shlex.split(test)


def test_no_example_writes_a_model_folder_named_emu2():
    # Python started beside a folder named emu2 imports that folder (a namespace package) instead of the
    # installed package, so emu2/__init__.py's import guards would not run.
    readme = (ROOT / "README.md").read_text()
    assert not re.search(r"--out emu2\s|from_pretrained\(\"emu2\"\)|--model emu2\s", readme)
