"""Faster ways to compute what the model already computes: prepacked GEMMs, compiled RMSNorm, memory release.

Each module installs itself on a loaded model and must give the same values as plain torch (up to
rounding); none knows about adapters, training or sampling.
"""
