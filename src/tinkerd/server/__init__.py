"""The HTTP front end: wire <-> engine calls, auth, futures and per-model ordering. Never imports torch."""
