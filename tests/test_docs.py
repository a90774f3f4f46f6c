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


def test_the_readmes_headline_over_seeds_is_the_committed_experiments():
    text = " ".join((ROOT / "README.md").read_text().split())  # prose as one line, whatever its wrapping
    summary = json.loads((ROOT / "experiments/metrics.json").read_text())
    seeds = summary["seeds"]
    overall = seeds["overall"]
    assert f"**lowers overall accuracy on {overall.get('hurts', 0)} of {seeds['bases']} bases**" in text
    assert f"insignificantly on the other {overall.get('no significant change', 0)}" in text
    if not overall.get("helps"):
        assert "It helps overall on none." in text
    rows = {"base accuracy": ("base_accuracy", 4), "LoRA-on accuracy": ("lora_on_accuracy", 4),
            "accuracy change": ("accuracy_change", 4), "target-digit errors, base": ("target_errors_base", 1),
            "target-digit errors, LoRA on": ("target_errors_lora_on", 1),
            "other digits' errors added": ("other_errors_added", 1)}
    for label, (key, digits) in rows.items():
        s = seeds[key]
        assert f"| {label} | {s['mean']:.{digits}f} | {s['ci95_low']:.{digits}f} to {s['ci95_high']:.{digits}f} |" in text, label
    long = summary["long_base"][0]
    assert f"three epochs (seed {long['seed']}: {long['base_accuracy']:.4f})" in text and long["epochs"] == 3
    assert f"({long['lora_on_accuracy']:.4f} with LoRA on; McNemar p = {long['mcnemar_p']:.3f})" in text
    assert "the change is not significant" in text and long["overall"] == "no significant change"


def test_the_readmes_sentence_on_the_one_base_where_lora_helps_is_the_committed_experiments():
    text = " ".join((ROOT / "README.md").read_text().split())
    backends = json.loads((ROOT / "experiments/metrics.json").read_text())["backends"]
    torch_signs, helps = backends["overall"]["torch"], backends["helps"]
    assert backends["verdict"] == "no significant difference" and "does not differ significantly from the default's" in text
    counts = [f"hurts on {torch_signs.get('hurts', 0)}", f"no significant change on {torch_signs.get('no significant change', 0)}",
              *([f"helps on {torch_signs['helps']}"] if "helps" in torch_signs else [])]
    assert f"give {', '.join(counts[:-1])} and {counts[-1]}" in text
    if not helps:
        assert "LoRA helps overall on none of the twenty" in text
    for base in helps:  # each base LoRA helps overall is named with its numbers
        assert (f"seed {base['seed']}'s ({base['base_accuracy']:.4f} → {base['lora_on_accuracy']:.4f}; "
                f"McNemar p = {base['mcnemar_p']:.3g})") in text, base
    results = [json.loads(path.read_text()) for path in (ROOT / "experiments/results/backends").glob("*.json")]
    assert len(results) == 20
