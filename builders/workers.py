"""`--workers W`: the images dealt to W spawned client processes, their counts added up here.

One event loop spends up to a core on the HTTP client at several hundred requests a
second; where a machine has cores to spare, each worker runs its own loop, client pool
and shard writer (shards are uuid-named and each writer merges only its own, so
writers never collide). Workers die with the parent and flush on SIGTERM.

`--workers 0` (the default) chooses from the free cores: the cores this process may
run on less the 1-minute load average, but no more than one worker per
SLOTS_PER_WORKER request slots or per MIN_IMAGES_PER_WORKER images, below which a
process costs more in start-up than it saves.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from queue import Empty

from domainbed_reasoning.builders.cost.pacing import Spend
from domainbed_reasoning.builders.sampling import REPORT_SECONDS, Counters, Share, sample_share

from domainbed_reasoning.errors import UserError

STOP_SECONDS = 10.0
PR_SET_PDEATHSIG = 1
AUTO = 0
SLOTS_PER_WORKER = 64
MIN_IMAGES_PER_WORKER = 2000


@dataclass(frozen=True)
class Report:
    """A worker process's running totals; the last one has `done` or carries its `error`."""

    worker: int
    counters: Counters
    done: bool = False
    error: Exception | None = None


def free_cores() -> int:
    """Cores this process may use that other work is not already using, at least one."""
    return max(1, len(os.sched_getaffinity(0)) - round(os.getloadavg()[0]))


def worker_count(requested: int, tasks: int, concurrency: int) -> int:
    """Never more processes than there are images or request slots; AUTO asks free_cores()."""
    if requested == AUTO:
        worth = min(concurrency // SLOTS_PER_WORKER, tasks // MIN_IMAGES_PER_WORKER)
        return max(1, min(free_cores(), worth))
    return max(1, min(requested, tasks, concurrency))


def split_shares(share: Share, workers: int) -> list[Share]:
    """Deal the (hash-ordered) images round-robin and the concurrency evenly: the total
    in flight stays `concurrency` and every process sees every domain and class."""
    total = share.config.teacher.concurrency
    slots = [total // workers + (index < total % workers) for index in range(workers)]
    return [
        replace(
            share,
            tasks=share.tasks.gather_every(workers, offset=index),
            config=replace(
                share.config, teacher=replace(share.config.teacher, concurrency=slots[index])
            ),
            pacing=share.pacing.divided(workers, slots[index]),
        )
        for index in range(workers)
    ]


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this worker when the parent dies (Linux), so a `kill -9` of
    the build leaves no orphan appending shards while a re-run resumes beside it."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


async def sample_until_stopped(share: Share, report: Callable[[Counters], None]) -> Counters:
    """SIGTERM cancels the sampling like Ctrl-C does in one process: buffered answers are flushed."""
    main = asyncio.current_task()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    return await sample_share(share, report, check=False)


def worker_main(index: int, parent_pid: int, share: Share, events: Queue) -> None:
    """A worker process: its own event loop, TeacherPool and CandidateWriter; counts go to the parent."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        counters = asyncio.run(
            sample_until_stopped(share, lambda counters: events.put(Report(index, counters)))
        )
    except asyncio.CancelledError:
        return
    except Exception as err:  # noqa: BLE001 - every failure goes to the parent, which raises it
        if not isinstance(err, UserError):
            err = RuntimeError(f"build worker {index} failed:\n{traceback.format_exc()}")
        events.put(Report(index, Counters(), error=err))
        return
    events.put(Report(index, counters, done=True))


def sample_in_workers(shares: list[Share], show: Callable[[Counters], None]) -> Counters:
    """Run each share in its own spawned process and add up their reports until all are done."""
    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    processes = [
        context.Process(
            target=worker_main,
            args=(index, os.getpid(), share, events),
            name=f"dbr-build-{index}",
            daemon=True,
        )
        for index, share in enumerate(shares)
    ]
    for process in processes:
        process.start()
    latest = {index: Report(index, Counters()) for index in range(len(shares))}
    try:
        while not all(report.done for report in latest.values()):
            report = next_report(events, processes, latest)
            if report.error is not None:
                raise report.error
            latest[report.worker] = report
            show(total(latest.values()))
    finally:
        stop(processes)
    return total(latest.values())


def total(reports: Iterable[Report]) -> Counters:
    counters = [report.counters for report in reports]
    return Counters(
        images=sum(c.images for c in counters),
        accepted=sum(c.accepted for c in counters),
        failed=sum(c.failed for c in counters),
        requests=sum(c.requests for c in counters),
        stopped=next((c.stopped for c in counters if c.stopped), None),
        spend=Spend.total(c.spend for c in counters),
    )


def next_report(events: Queue, processes: list[BaseProcess], latest: dict[int, Report]) -> Report:
    """The next report. A worker that had exited before an empty wait began cannot still have
    a report on the way: it was killed from outside (OOM, a signal) before it finished."""
    while True:
        gone = [i for i, p in enumerate(processes) if p.exitcode is not None and not latest[i].done]
        try:
            return events.get(timeout=REPORT_SECONDS * 5)
        except Empty:
            if gone:
                raise UserError(
                    f"build worker {gone[0]} stopped before finishing (exit code "
                    f"{processes[gone[0]].exitcode}): re-run the same command to resume"
                ) from None


def stop(processes: list[BaseProcess]) -> None:
    """Ask live workers to flush and exit (SIGTERM), then kill what is left after STOP_SECONDS."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + STOP_SECONDS
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
