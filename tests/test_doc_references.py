"""References to the project's reference documents point at files and sections that exist in the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC_REF = re.compile(r"docs/([\w.-]+\.md)")
# "docs/comfy-api-contract.md §1.2-1.3, §3.8" and "§1.7 and §3": every section number after the path.
SECTION_REF = re.compile(r"docs/comfy-api-contract\.md((?:[ ,]*(?:and )?§[\d.]+(?:-[\d.]+)?)+)")
SECTION = re.compile(r"§([\d.]+)(?:-([\d.]+))?")
STALE = re.compile(r"shared/BENCHMARKS|shared/COMFY_API_CONTRACT|contract sections? \d|\(contract \d")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    files = [REPO / n for n in names if n.endswith((".py", ".md", ".sh", ".toml", "Dockerfile", ".yml", ".yaml"))
             and not n.startswith("docs/") and n != "tests/test_doc_references.py"]
    return [f for f in files if f.is_file()]


def contract_sections() -> set[str]:
    text = (REPO / "docs" / "comfy-api-contract.md").read_text()
    return set(re.findall(r"^#+ (\d+(?:\.\d+)*)\.? ", text, flags=re.MULTILINE))


def test_referenced_docs_and_sections_exist():
    sections = contract_sections()
    assert {"1.3", "3.1", "4.1", "5"} <= sections
    problems = []
    for path in tracked_text_files():
        text = path.read_text(errors="replace")
        for name in DOC_REF.findall(text):
            if not (REPO / "docs" / name).is_file():
                problems.append(f"{path.relative_to(REPO)}: docs/{name} does not exist")
        for refs in SECTION_REF.findall(text):
            for first, last in SECTION.findall(refs):
                for number in filter(None, (first.rstrip("."), last.rstrip("."))):
                    if number not in sections:
                        problems.append(f"{path.relative_to(REPO)}: no section {number} in the contract")
        if STALE.search(text):
            problems.append(f"{path.relative_to(REPO)}: still points outside the repository or to a bare 'contract'")
    assert not problems, "\n".join(problems)
