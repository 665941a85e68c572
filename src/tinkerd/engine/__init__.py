"""The PyTorch engine: base models, multi-adapter LoRA, losses, optimizer and sampler.

Knows nothing about HTTP, sessions or futures; the server drives it through `engine.interface`.
"""
