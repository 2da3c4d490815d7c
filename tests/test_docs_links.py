"""The documentation's relative links: every linked file exists, every #anchor is a heading
of the linked markdown file (GitHub's heading ids), and no doc links outside the repository."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
               *(ROOT / "benchmarks").glob("*.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_id(heading: str) -> str:
  """GitHub's id for a markdown heading: lower case, punctuation but - and _ dropped,
  spaces to hyphens."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _headings(path: pathlib.Path) -> set[str]:
  lines, fenced = [], False
  for line in path.read_text().splitlines():
    fenced ^= line.startswith("```")
    if not fenced and line.startswith("#"):
      lines.append(heading_id(line.lstrip("#")))
  return set(lines)


def _links(path: pathlib.Path):
  for link in LINK.findall(path.read_text()):
    if not re.match(r"[a-z]+:", link):
      yield link


def test_heading_ids_follow_github():
  assert heading_id("How the full grid was computed (`full.gin`, 2026-12-04/06)") == (
      "how-the-full-grid-was-computed-fullgin-2026-12-0406")
  assert heading_id("Hugging Face checkpoints: a/b_c.py") == "hugging-face-checkpoints-ab_cpy"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(doc):
  broken = []
  for link in _links(doc):
    path, _, anchor = link.partition("#")
    target = (doc.parent / path).resolve() if path else doc
    if ROOT not in target.parents and target != ROOT:
      broken.append(f"{link} (outside the repository)")
    elif not target.exists():
      broken.append(f"{link} (no such file)")
    elif anchor and target.suffix == ".md" and anchor not in _headings(target):
      broken.append(f"{link} (no such heading)")
  assert not broken, f"{doc.relative_to(ROOT)}: " + ", ".join(broken)
