"""Every ``docs/<file>.md#<section>`` cited anywhere in the repository names a file and a heading that exist
(GitHub's anchor rule: lower case, punctuation dropped, spaces to hyphens), and so do the links inside docs/."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CITE = re.compile(r"docs/([A-Za-z0-9_]+\.md)#([A-Za-z0-9_-]+)")
LINK = re.compile(r"\]\(([A-Za-z0-9_]*\.md)?#([A-Za-z0-9_-]+)\)")


def anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    out, in_code = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            out.add(anchor(line.lstrip("#")))
    return out


def _tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / n for n in names.splitlines() if n.endswith((".py", ".md", ".cpp", ".h", ".cu", ".cuh", ".toml"))]


def test_anchor_rule():
    assert anchor("AdaBin weight binarizer") == "adabin-weight-binarizer"
    assert anchor("Adder PTQ Fig. 3 vector") == "adder-ptq-fig-3-vector"


def test_every_cited_section_exists():
    known = {p.name: anchors(p) for p in DOCS.glob("*.md")}
    missing = []
    for path in _tracked_text_files():
        if not path.is_file():
            continue
        for doc, sec in CITE.findall(path.read_text(encoding="utf-8", errors="replace")):
            if sec not in known.get(doc, ()):
                missing.append(f"{path.relative_to(ROOT)}: docs/{doc}#{sec}")
    assert not missing, "\n".join(missing)


def test_links_inside_docs_resolve():
    known = {p.name: anchors(p) for p in DOCS.glob("*.md")}
    missing = []
    for path in DOCS.glob("*.md"):
        for doc, sec in LINK.findall(path.read_text(encoding="utf-8")):
            if sec not in known.get(doc or path.name, ()):
                missing.append(f"{path.name}: {doc or ''}#{sec}")
    assert not missing, "\n".join(missing)
