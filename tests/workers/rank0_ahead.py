"""`dbr` under `accelerate launch` with rank 0 always ahead: the other ranks join the process
group, then start the command only once rank 0 waits at a barrier (or has exited).

Usage: `rank0_ahead.py MARKER dbr-arguments...`. Rank 0 creates MARKER whenever it enters
`wait_for_everyone`; every other rank waits for MARKER before running the command at all.
This is the worst interleaving a real launch can produce: whatever rank 0 writes before its
first barrier, the others see. A check that another rank's write can change must be made
before that barrier, so a missing one fails here every time.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from pathlib import Path

from accelerate.state import PartialState
from domainbed_reasoning.train.sarr.sharding import process_state

from domainbed_reasoning.cli import main

MARKER = Path(sys.argv[1])
RANK = int(os.environ.get("RANK", "0"))
WAIT_LIMIT_S = 600  # far past any launch; rank 0 creates MARKER at its first barrier or exit


def _arrive() -> None:
    MARKER.touch()


def _await_rank0() -> None:
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not MARKER.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"rank {RANK}: rank 0 never reached a barrier")
        time.sleep(0.05)


if RANK == 0:
    atexit.register(_arrive)
    barrier = PartialState.wait_for_everyone

    def wait_for_everyone(self: PartialState) -> None:
        _arrive()
        barrier(self)

    PartialState.wait_for_everyone = wait_for_everyone
else:
    process_state()  # joins the group rank 0 is creating, then holds this rank back
    _await_rank0()

sys.argv = ["dbr", *sys.argv[2:]]
main()
