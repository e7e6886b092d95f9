"""The manual stays honest: tags resolve, links land, examples compile, the README stays short.

``mkdocs build --strict`` (in ``.ci/run``) catches broken links and anchors between the
pages of ``docs/``; these tests cover what it cannot see: the README, the requirement
tags in the code and tests, and whether the Python examples are Python at all. Each check
is a plain function over text, so each is also shown to fail on a made-up input.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import triomail
import triomail.testing

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
SECURITY = DOCS / "security.md"
PAGES = sorted(DOCS.rglob("*.md"))

#: A requirement tag as the code and tests write it: ``R16``, ``(R37/R38)``, ``R3-R6``.
TAG = re.compile(r"\bR(\d+)\b")
#: A rule's heading on the security page, with the anchor a tag links to.
RULE_HEADING = re.compile(r"^#{2,4} R(\d+): .+ \{ #r(\d+) \}$", re.MULTILINE)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
TEXT_SUFFIXES = {".py", ".md", ".txt", ".toml", ".cfg", ".ini", ".csv"}
README_MAX_LINES = 200


# -- the checks, as functions over text --------------------------------------------------


def defined_rules(security_page: str) -> set[int]:
    """Rule numbers with a ``## Rn: title { #rn }`` heading (number and anchor agreeing)."""
    return {int(n) for n, anchor in RULE_HEADING.findall(security_page) if n == anchor}


def undefined_tags(texts: dict[str, str], defined: set[int]) -> dict[str, list[int]]:
    """For each text that uses a tag the security page does not define: those tags."""
    missing: dict[str, list[int]] = {}
    for name, text in texts.items():
        used = sorted({int(n) for n in TAG.findall(text)} - defined)
        if used:
            missing[name] = used
    return missing


def strip_code(markdown: str) -> str:
    """The prose of a Markdown text: fenced blocks and inline code removed."""
    return INLINE_CODE.sub("", FENCE.sub("", markdown))


def heading_anchors(markdown: str) -> set[str]:
    """Anchors of a page's headings: explicit ``{ #id }``, else a GitHub-style slug."""
    anchors = set()
    for line in FENCE.sub("", markdown).splitlines():
        if not line.startswith("#"):
            continue
        title = line.lstrip("#").strip()
        explicit = re.search(r"\{ #([\w-]+) \}$", title)
        if explicit:
            anchors.add(explicit.group(1))
            continue
        slug = re.sub(r"[^\w\- ]", "", title.lower()).strip().replace(" ", "-")
        anchors.add(slug)
    return anchors


def broken_links(page: Path, markdown: str) -> list[str]:
    """Relative links of a page whose file, or whose anchor in a Markdown file, is missing."""
    broken = []
    for target in LINK.findall(strip_code(markdown)):
        if re.match(r"[a-z][a-z+.-]*:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.exists():
            broken.append(f"{target} (no file {path})")
        elif anchor and path.suffix == ".md" and anchor not in anchors_of(path):
            broken.append(f"{target} (no heading #{anchor} in {path.name})")
    return broken


def anchors_of(path: Path) -> set[str]:
    return heading_anchors(path.read_text(encoding="utf-8"))


def python_blocks(markdown: str) -> list[tuple[int, str]]:
    """(line number, source) of every ```python block."""
    return [
        (markdown.count("\n", 0, match.start()) + 2, match.group(2))
        for match in FENCE.finditer(markdown)
        if match.group(1) == "python"
    ]


def section(markdown: str, title: str) -> str:
    """The text of the ``## title`` section, up to the next heading of that level."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    assert match, f"no '## {title}' section"
    return match.group(1)


def sh_blocks(markdown: str) -> list[str]:
    return [m.group(2).strip() for m in FENCE.finditer(markdown) if m.group(1) == "sh"]


# -- the repository ----------------------------------------------------------------------


def tagged_sources() -> dict[str, str]:
    texts = {}
    for top in ("triomail", "tests", "bench"):
        for path in sorted((ROOT / top).rglob("*")):
            if path.suffix in TEXT_SUFFIXES and "__pycache__" not in path.parts:
                texts[str(path.relative_to(ROOT))] = path.read_text(encoding="utf-8")
    return texts


def test_every_requirement_tag_is_defined_in_security_md() -> None:
    defined = defined_rules(SECURITY.read_text(encoding="utf-8"))
    assert undefined_tags(tagged_sources(), defined) == {}


def test_security_md_defines_r1_to_r48_once_each() -> None:
    numbers = [int(n) for n, _ in RULE_HEADING.findall(SECURITY.read_text(encoding="utf-8"))]
    assert numbers == list(range(1, 49))


def test_the_tag_check_can_fail() -> None:
    page = "### R1: First { #r1 }\n\n### R2: Anchor disagrees { #r3 }\n\n### R4: No anchor\n"
    assert defined_rules(page) == {1}
    unknown = max(defined_rules(SECURITY.read_text(encoding="utf-8"))) + 1
    texts = {"made_up.py": f"x = 1  # R{unknown}: made up\n", "fine.py": "# R1 and R16\n"}
    assert undefined_tags(texts, {1, 16}) == {"made_up.py": [unknown]}
    assert undefined_tags({"range.py": "(R1-R2)"}, {1}) == {"range.py": [2]}


def test_the_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the manual is docs/"


def test_the_readme_has_exactly_the_two_commands() -> None:
    readme = README.read_text(encoding="utf-8")
    commands = sh_blocks(section(readme, "Two commands"))
    assert sh_blocks(readme) == commands, "sh blocks belong to 'Two commands' only"
    assert len(commands) == 2
    main_job, tests = commands
    assert "\n" not in main_job and "\n" not in tests, "one line each, to copy and paste"
    assert main_job.startswith("python3 -m venv .venv && .venv/bin/pip install -e '.[cli]'")
    assert main_job.endswith(
        ".venv/bin/triomail send examples/recipients.csv examples/template.txt"
        " --unsubscribe 'https://example.com/unsubscribe?u={{number}}' --sink outbox"
    )
    assert tests == "bash .ci/run"


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page: Path) -> None:
    assert broken_links(page, page.read_text(encoding="utf-8")) == []


def test_the_link_check_can_fail(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# Here\n\n## R5: Last { #r5 }\n", encoding="utf-8")
    page = tmp_path / "page.md"
    text = (
        "[ok](there.md) [ok](there.md#here) [ok](there.md#r5) [web](https://example.com)\n"
        "[gone](missing.md) [no anchor](there.md#nowhere)\n"
        "`[code](not-a-link.md)`\n\n```text\n[fenced](not-a-link-either.md)\n```\n"
    )
    assert [b.split(" ")[0] for b in broken_links(page, text)] == [
        "missing.md",
        "there.md#nowhere",
    ]


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_compile(page: Path) -> None:
    for line, source in python_blocks(page.read_text(encoding="utf-8")):
        compile(source, f"{page.relative_to(ROOT)}:{line}", "exec")


def test_the_compile_check_can_fail() -> None:
    page = "text\n\n```python\nasync with open_pool() as pool:\n    pass\n```\n"
    [(line, source)] = python_blocks(page)
    assert line == 4
    with pytest.raises(SyntaxError):
        compile(source, "page.md", "exec")


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocstrings_handlers") is None,
    reason="the docs extra is not installed (pip install -e '.[docs]')",
)
def test_the_api_reference_renders_every_public_name(tmp_path: Path) -> None:
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    anchors = set(re.findall(r'id="(triomail[\w.]*)"', api))
    public = {f"triomail.{n}" for n in triomail.__all__}
    public |= {f"triomail.testing.{n}" for n in triomail.testing.__all__}
    assert public - anchors == set()
