"""Persistence of sessions, models, futures and checkpoint metadata. No torch, no HTTP."""
