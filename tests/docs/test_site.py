"""The documentation: the site builds, the README stays a front page, and nothing points nowhere.

- `mkdocs build --strict` succeeds (mkdocs.yml, docs/, protocol.md included into the site);
- README.md stays short: everything else lives in docs/;
- every relative link in the Markdown files resolves to a file, and an anchor on a link to a
  Markdown file names one of its headings;
- every repository path the code, the tests and the docs name in their text (a document at the
  root, or a file under sidecar/, tests/, bench/, ...) exists: a renamed or removed file leaves
  no reference behind, and no text sends the reader to a document the repository lacks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 250

# The Markdown files whose links must resolve.
LINKED_DOCS = sorted(
    {ROOT / "README.md", ROOT / "protocol.md", ROOT / "bench" / "README.md"}
    | {ROOT / "systemd" / "README.md"}
    | set((ROOT / "docs").rglob("*.md"))
    | set((ROOT / "examples").rglob("*.md"))
)

# Where text naming repository files is checked: folders (every text file in them) and files.
NAMING_DIRS = ["sidecar", "tests", "bench", "docs", "examples"]
NAMING_FILES = ["README.md", "protocol.md"]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1[`~]*[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
SNIPPET = re.compile(r'^--8<--\s+"([^"]+)"\s*$', re.M)

# A path under one of the repository's folders, with a file extension...
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:sidecar|tests|bench|docs|examples|systemd|deploy)/[\w./-]*\w"
    r"\.(?:py|md|sh|lua|ya?ml|json|toml))\b"
)
# ... or a Markdown document by its bare name (resolved at the root or beside the file naming it).
DOC_NAME = re.compile(r"(?<![\w./-])([A-Za-z][\w-]*\.md)\b")


def test_the_site_builds_strict(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about its future
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    protocol = (tmp_path / "site" / "protocol" / "index.html").read_text()
    assert "Life cycle of a request" in protocol, "protocol.md was not included in the site"


def test_the_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move details to docs/"
    )


def test_every_docs_page_is_in_the_site_nav() -> None:
    """mkdocs only warns about a page outside the nav (validation.omitted_files); say which."""
    config = (ROOT / "mkdocs.yml").read_text()
    nav = set(re.findall(r":\s*([\w/-]+\.md)\s*$", config, re.M))
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert pages - nav == set(), "docs pages missing from mkdocs.yml's nav"
    assert nav - pages == set(), "mkdocs.yml's nav names pages docs/ does not have"


def _prose(markdown: str) -> str:
    """The Markdown without code blocks and code spans, where brackets are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", markdown))


def _text_with_snippets(path: Path) -> str:
    """A page's text with the files it includes (pymdownx.snippets, paths from the root)."""
    text = path.read_text()
    return SNIPPET.sub(lambda m: (ROOT / m.group(1)).read_text(), text)


def _anchors(path: Path) -> set[str]:
    """The anchors of a page's headings, as GitHub and MkDocs' toc both make them."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in HEADING.findall(FENCE.sub("", _text_with_snippets(path))):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
        slug = re.sub(r"[^\w\- ]", "", text).strip().replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_links(path: Path) -> list[str]:
    """Each relative link of a Markdown file whose file, or heading anchor, does not exist."""
    prose = _prose(path.read_text())
    broken = []
    for target in LINK.findall(prose) + REFERENCE.findall(prose):
        if SCHEME.match(target) or target.startswith("/"):
            continue  # a URL (checked by nobody here: no network) or a site-absolute path
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target} (no {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {_shown(resolved)})")
    return broken


def test_every_relative_link_in_the_markdown_resolves() -> None:
    found = {
        str(path.relative_to(ROOT)): broken
        for path in LINKED_DOCS
        if (broken := broken_links(path))
    }
    assert found == {}


def _naming_files() -> list[Path]:
    """The repository's own files in NAMING_DIRS: tracked or new, never what .gitignore leaves
    out (the bench's node_modules, caches), which the repository does not own."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *NAMING_DIRS],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=True,
    ).stdout.splitlines()  # fmt: skip
    files = [ROOT / name for name in NAMING_FILES]
    files += [ROOT / name for name in sorted(set(listed)) if (ROOT / name).is_file()]
    return files


def missing_names(path: Path) -> list[str]:
    """`file:line: name` for each repository path or document named in path that is absent."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        return []  # not text
    missing = []
    for number, line in enumerate(text.splitlines(), 1):
        for name in REPO_PATH.findall(line):
            if not (ROOT / name).exists():
                missing.append(f"{_shown(path)}:{number}: {name}")
        for name in DOC_NAME.findall(line):
            if not ((ROOT / name).exists() or (path.parent / name).exists()):
                missing.append(f"{_shown(path)}:{number}: {name}")
    return missing


def test_every_document_and_path_named_exists() -> None:
    missing = [entry for path in _naming_files() for entry in missing_names(path)]
    assert missing == [], "text names files the repository does not have:\n" + "\n".join(missing)


def test_the_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    """The scanners themselves: a missing document, a stale path, a dead link and anchor."""
    # The names are built, so that this file itself names no missing document.
    md = ".md"
    design, stale = f"DESIGN{md}", "tests/" + "test_nowhere.py"
    page = tmp_path / f"page{md}"
    page.write_text(
        f"See {design} and `{stale}`, [a link](missing{md}), [ok](page{md}#a-heading),\n"
        f"[bad anchor](page{md}#nowhere), [web](https://example.com/x{md}) and\n"
        f"```\n[not a link](in-code{md})\n```\n\n## A heading\n"
    )
    assert missing_names(page) == [
        f"{page}:1: {stale}", f"{page}:1: {design}", f"{page}:1: missing{md}",
        f"{page}:4: in-code{md}",
    ]  # fmt: skip
    assert broken_links(page) == [
        f"missing{md} (no {tmp_path / f'missing{md}'})",
        f"page{md}#nowhere (no heading #nowhere in {page})",
    ]


def _shown(path: Path) -> str:
    """A path as a failure message shows it: from the repository root when it is inside."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
