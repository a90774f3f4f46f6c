"""lora_mnist: the experiment of the seed notebook (bench/seed_notebook.py), built on the ``lora`` library.

data (MNIST's IDX files) · mlp (the oversized classifier and its weights file) · batches (seeded batch
order, the fine-tuning selection) · train (the one training entry point) · metrics (evaluation) ·
backend (the one boundary to the fast paths of fast/) · integrity (the frozen-base check) · io (atomic
writes) · memory (the memory check before loading) · errors.
"""
