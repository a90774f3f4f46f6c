"""stages: one thin script per DVC stage (dvc.yaml, experiments/dvc.yaml), run as ``python -m stages.<stage>``.

A stage reads params.yaml through lora_mnist.params, does its one step with the code of lora_mnist, and writes
its outputs; a stage never imports another. Each entry point that trains or scores sets the CPU pins of
lora_mnist.reproducible before torch loads.
"""
