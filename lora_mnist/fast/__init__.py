"""The fast paths. Only lora_mnist.backend imports them; each computes what the plain PyTorch path does.

adam (torch's fused Adam kernel without torch.optim's import cost) · cpu_kernels (pretraining on CPU in C,
linear_adam.c) · cuda_graphs (optimizer steps replayed from CUDA graphs) · sparse (evaluation with the
mostly-zero hidden layer as a sparse matrix).
"""
