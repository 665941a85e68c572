"""The PyTorch compute core: base models, multi-adapter LoRA, losses, optimizer, sampler and kernels.

Knows nothing about HTTP, sessions, futures or where it runs (in this process, a Ray actor, an FSDP
rank: `tinkerd.backends`); the control plane drives it through `engine.interface` alone.
"""
