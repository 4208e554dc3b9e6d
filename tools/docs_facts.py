"""Check that a docs rewrite lost no fact: every figure and citation of an old README must still be somewhere in
README.md or docs/*.md.

    python tools/docs_facts.py [REV]        # REV: the commit whose README.md is the reference (default HEAD)

Figures are the numbers of the old text (thousands separators ignored); citations are URLs, `owner/repo issue N`
and `repo#N` references, and source paths (`common/arg.cpp`, `tests/test_x.py`, ...). Inline code spans the new
text no longer has are listed too, for a reviewer (not a failure: a rewrite may word a command differently).
Exit 1 when a figure or a citation is missing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?")
CITATIONS = (
    re.compile(r"https?://[^\s)`>\]]+"),
    re.compile(r"\b[\w-]+/[\w.-]+ (?:issue|PR|pull) #?\d+"),
    re.compile(r"\b[\w.-]+#\d+"),
    re.compile(r"\b[\w./-]+\.(?:cpp|cu|c|h|py|yaml|yml|json|jsonl|jinja|toml|lock)\b"),
)
CODE_SPAN = re.compile(r"`([^`\n]+)`")


def numbers(text: str) -> set[str]:
    """Every number, commas dropped and a trailing '.0'-style decimal kept as written."""
    return {m.group(0).replace(",", "").rstrip(".") for m in NUMBER.finditer(text)}


def citations(text: str) -> set[str]:
    return {m.group(0).rstrip(".,;:") for pattern in CITATIONS for m in pattern.finditer(text)}


def new_corpus() -> str:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n".join(p.read_text() for p in files if p.is_file())


def main(argv: list[str]) -> int:
    rev = argv[0] if argv else "HEAD"
    old = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:README.md"], check=True,
                         capture_output=True, text=True).stdout
    new = new_corpus()
    missing_numbers = sorted(numbers(old) - numbers(new), key=lambda s: (len(s), s))
    new_flat = new.replace(",", "")
    missing_citations = sorted(c for c in citations(old) if c not in new and c.replace(",", "") not in new_flat)
    spans_new = set(CODE_SPAN.findall(new))
    missing_spans = sorted({s for s in CODE_SPAN.findall(old) if s not in spans_new and s not in new})
    print(f"old README at {rev}: {len(old.splitlines())} lines, {len(numbers(old))} distinct figures, "
          f"{len(citations(old))} citations, {len(set(CODE_SPAN.findall(old)))} code spans")
    print(f"new README + docs/*.md: {len(new.splitlines())} lines")
    print(f"figures missing: {len(missing_numbers)}" + (f": {' '.join(missing_numbers)}" if missing_numbers else ""))
    print(f"citations missing: {len(missing_citations)}" + ("".join(f"\n  {c}" for c in missing_citations)))
    print(f"code spans not found verbatim (review only): {len(missing_spans)}"
          + "".join(f"\n  `{s}`" for s in missing_spans))
    return 1 if missing_numbers or missing_citations else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
