"""Experiment stage report: experiments/results/ collected into experiments/report.md, its plots and
experiments/metrics.json (lora_mnist/report.py builds each section)."""
# ruff: noqa: E402  (the CPU pins go in before torch loads)
from lora_mnist.reproducible import pin_cpu_arithmetic

if __name__ == "__main__":
    pin_cpu_arithmetic()

from lora_mnist.cli import run_stage
from lora_mnist.report import write_report


def main() -> None:
    run_stage(lambda params: write_report())


if __name__ == "__main__":
    main()
