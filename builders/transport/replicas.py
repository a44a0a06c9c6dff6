"""Which teacher replica gets the next request: the healthy one with the fewest in flight.

A replica that refuses connections (a dead node) leaves the rotation at once; one that
fails `eject_after` requests in a row (5xx, timeouts, dropped connections) leaves too.
Either is probed (GET /models) after a backoff that doubles up to `probe_max_s`, and
rejoins when the probe answers; the backoff only resets after a real request succeeds,
so a replica whose /models answers while its completions fail does not flap back at
full rate. When no replica is left, requests wait (`outage_wait_s`) for one to come
back, and then raise `AllReplicasDown`, which stops the build with a resume hint.
A 429 is load, not ill health: it is retried (after Retry-After), never ejected.
A replica whose inference engine has died (vLLM answers every completion with HTTP 500
"EngineCore encountered an issue" while its /models still answers) never comes back
by itself: it leaves the rotation for good, and when every replica is in that state
`TeacherEngineDied` stops the build at once instead of waiting out `outage_wait_s`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from domainbed_reasoning.errors import UserError

# The message of vLLM's EngineDeadError, which its API server sends back with HTTP 500.
ENGINE_DEAD = "EngineCore encountered an issue"
SERVE_TEACHER_LOG = "runs/vllm/teacher.log"  # `dbr serve-teacher`'s default --log


@dataclass(frozen=True)
class HealthPolicy:
    eject_after: int = 5
    probe_first_s: float = 0.5
    probe_max_s: float = 30.0
    outage_wait_s: float = 1800.0
    server_log: str | None = None  # the served engine's log, named when the engine dies

    def __post_init__(self) -> None:
        if self.outage_wait_s < 0:
            raise UserError(f"--outage-wait {self.outage_wait_s:g}: must be 0 seconds or more")


class AllReplicasDown(UserError):
    """Every replica stayed down for `outage_wait_s`. The builder stops its slots, writes what
    was answered and exits 3; any other client (evaluation, SARR) fails in one line."""


class TeacherEngineDied(AllReplicasDown):
    """Every replica's inference engine died: no wait brings one back, so the build stops at once."""


@dataclass(eq=False)
class Replica:
    url: str
    host: str
    headers: dict[str, str] = field(repr=False)
    in_flight: int = 0
    failures: int = 0
    healthy: bool = True
    probe_delay: float = 0.0
    last_error: str = ""
    dead: bool = False  # its engine died: out of the rotation for good

    @property
    def chat_url(self) -> str:
        return self.url.rstrip("/") + "/chat/completions"

    @property
    def models_url(self) -> str:
        return self.url.rstrip("/") + "/models"


Probe = Callable[[Replica], Awaitable[bool]]


class ReplicaSet:
    """Health bookkeeping for one event loop; `probe` and `say` come from the client."""

    def __init__(
        self,
        replicas: list[Replica],
        policy: HealthPolicy,
        probe: Probe,
        say: Callable[[str], None],
    ) -> None:
        self.replicas = replicas
        self.policy = policy
        self.probe = probe
        self.say = say
        self.back = asyncio.Event()
        self.down_since: float | None = None
        self.probes: set[asyncio.Task] = set()

    def pick(self, avoid: Replica | None = None) -> Replica | None:
        """The healthy replica with the fewest in flight, `avoid` only if it is the last one."""
        healthy = [r for r in self.replicas if r.healthy]
        others = [r for r in healthy if r is not avoid] or healthy
        return min(others, key=lambda r: r.in_flight, default=None)

    async def acquire(self, avoid: Replica | None = None) -> Replica:
        """A healthy replica, waiting out an outage of every replica for at most `outage_wait_s`."""
        while (replica := self.pick(avoid)) is None:
            if all(r.dead for r in self.replicas):
                raise TeacherEngineDied(self._died_message())
            remaining = self.down_since + self.policy.outage_wait_s - time.monotonic()
            try:
                await asyncio.wait_for(self.back.wait(), max(0.0, remaining))
            except TimeoutError:
                raise AllReplicasDown(self._stopped_message()) from None
        return replica

    def succeeded(self, replica: Replica) -> None:
        replica.failures = 0
        replica.probe_delay = 0.0

    def failed(self, replica: Replica, detail: str, *, hard: bool) -> None:
        """Count a failure; eject on a refused connection, or after `eject_after` in a row;
        retire the replica for good when the detail says its engine died."""
        replica.failures += 1
        replica.last_error = detail
        if ENGINE_DEAD in detail:
            self._retire(replica)
        elif replica.healthy and (hard or replica.failures >= self.policy.eject_after):
            self._eject(replica)

    def _retire(self, replica: Replica) -> None:
        if replica.dead:
            return
        was_healthy = replica.healthy
        replica.dead, replica.healthy = True, False
        if all(r.dead for r in self.replicas):
            self.back.set()  # whoever waits for a replica wakes up to raise TeacherEngineDied
        elif not was_healthy:
            return  # already out of the rotation; its probe stops
        elif not any(r.healthy for r in self.replicas):
            self._outage_began()
        else:
            self.say(f"teacher replica {replica.host}'s engine died ({self._log_hint()}); it stays out of the rotation")

    def _eject(self, replica: Replica) -> None:
        replica.healthy = False
        replica.probe_delay = min(
            max(replica.probe_delay * 2, self.policy.probe_first_s), self.policy.probe_max_s
        )
        if not any(r.healthy for r in self.replicas):
            self._outage_began()
        else:
            self.say(f"teacher replica {replica.host} left the rotation ({replica.last_error})")
        task = asyncio.create_task(self._probe_until_back(replica))
        self.probes.add(task)
        task.add_done_callback(self.probes.discard)

    def _outage_began(self) -> None:
        self.down_since = time.monotonic()
        self.back.clear()
        self.say(
            f"every teacher replica is down ({self._errors()}); waiting up to "
            f"{self.policy.outage_wait_s:g} s for one to come back (--outage-wait)"
        )

    async def _probe_until_back(self, replica: Replica) -> None:
        while True:
            await asyncio.sleep(replica.probe_delay)
            if replica.dead:
                return
            if await self.probe(replica):
                break
            replica.probe_delay = min(replica.probe_delay * 2, self.policy.probe_max_s)
        replica.healthy = True
        replica.failures = 0
        self.down_since = None
        self.back.set()
        self.say(f"teacher replica {replica.host} is back in the rotation")

    def _errors(self) -> str:
        return "; ".join(f"{r.host}: {r.last_error}" for r in self.replicas)

    def _stopped_message(self) -> str:
        return (
            f"every teacher replica stayed down for {self.policy.outage_wait_s:g} s "
            f"({self._errors()}): stopped; run the same command again to resume"
        )

    def _log_hint(self) -> str:
        if self.policy.server_log:
            return f"its log: {self.policy.server_log}"
        return f"see its log; `dbr serve-teacher` writes {SERVE_TEACHER_LOG} unless --log says otherwise"

    def _died_message(self) -> str:
        hosts = ", ".join(r.host for r in self.replicas)
        return (
            f"the teacher's engine died on {hosts} (every request answered HTTP 500 "
            f"\"{ENGINE_DEAD}\"; {self._log_hint()}): restart the teacher and run the same command again to resume"
        )

    async def close(self) -> None:
        for task in self.probes:
            task.cancel()
        await asyncio.gather(*self.probes, return_exceptions=True)
