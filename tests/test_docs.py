"""The README is a front door of at most 150 lines whose result table is the committed run's, and every page
and file it or docs/ links to exists."""
from __future__ import annotations

import csv
import json
import re

from tests.helpers import ROOT


def test_the_readme_is_at_most_150_lines_and_links_to_the_docs_pages():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    for page in ("library", "orchestration", "experiments", "performance"):
        assert f"(docs/{page}.md)" in text


def test_the_readmes_result_table_is_the_committed_runs():
    text = (ROOT / "README.md").read_text()
    rows = list(csv.DictReader((ROOT / "reports/per_digit_errors.csv").open()))
    evaluation = json.loads((ROOT / "metrics/evaluate.json").read_text())
    for row in rows:
        mark = " (fine-tuned)" if int(row["digit"]) == evaluation["digit"] else ""
        assert f"| {row['digit']}{mark} | {row['base']} | {row['lora_on']} | {row['lora_off']} |" in text
    accuracies = " | ".join(f"{evaluation[key]['accuracy']:.4f}" for key in ("base", "lora_on", "lora_off"))
    assert f"| **accuracy** | {accuracies} |" in text


def test_every_relative_link_in_the_readme_and_docs_points_to_a_file():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to {target}"
