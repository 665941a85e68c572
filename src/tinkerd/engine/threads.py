"""How many threads torch computes with, and how soon idle OpenMP workers sleep.

Called once per engine process before torch does any work: `tinkerd serve`, a Ray engine actor,
an FSDP rank. Knows the environment variables of GNU OpenMP and torch's thread settings, nothing
about models.
"""

from __future__ import annotations

import logging
import os
import sys

# GNU OpenMP (torch's) spins an idle worker 300,000 iterations before it sleeps. Measured here (2 cores,
# SmolLM2 LoRA step): alone, 10,000 costs ~5 % vs the default and OMP_WAIT_POLICY=PASSIVE ~20 %; with
# two such processes side by side the default makes both ~7x slower, 10,000 ~2.5x, PASSIVE ~2x.
SHORT_SPIN = "10000"


def configure_threads(threads: int | None) -> str:
    """Before torch loads: a short OpenMP spin (unless the environment sets OMP_WAIT_POLICY or
    GOMP_SPINCOUNT), so idle worker threads soon stop burning cores that other processes need; then
    `threads` compute and inter-op threads. Returns a summary for the log."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    late = "torch" in sys.modules  # in-process callers (tests): the OpenMP runtime has read its environment
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SHORT_SPIN)
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:  # inter-op threads can only be set before any inter-op work ran
            logging.getLogger("tinkerd").warning("--threads: inter-op threads were already started; left at %d",
                                                 torch.get_num_interop_threads())
    name = "OMP_WAIT_POLICY" if "OMP_WAIT_POLICY" in os.environ else "GOMP_SPINCOUNT"
    policy = os.environ[name] + (" (set after torch was imported: no effect)" if late else "")
    return (f"torch threads {torch.get_num_threads()}, inter-op threads {torch.get_num_interop_threads()}, "
            f"{name}={policy}")
