"""``capture --executor ray``: one engine per Ray actor, shards handed to actors as they become free.

Who writes what (docs/distributed.md, "Ray"). The driver (the process running ``capture``) plans once,
holds the lock of part manifest 0 and is the only process that writes a manifest: it records every
shard an actor returns exactly as the local executor records its own, as worker 0 of 1. So the
format does not change, a Ray run equals a local one element by element, and a later plain run (or
another ``--executor ray`` run) resumes it. Actors only write shard directories (under ``_tmp/``, then
renamed into ``shards/``), which count once the driver's part manifest names them.

Failures. An actor that dies (killed, preempted, its node lost) is restarted by Ray when resources
allow and rejoins; the shard it was writing goes back to the queue and is taken by the next free
actor. Its leftovers cannot count: a half-written ``_tmp/`` directory is never named, and a shard
directory it published but the driver never recorded is replaced by the retry (same input, settings
and seed: same bytes). A shard that fails more than ``--ray-max-retries`` times stops the run; what
is recorded stays, and the same command resumes. A ``LogitcacheError`` (bad settings, a teacher that
differs between machines) is not retried: it says what to fix. An actor that dies while loading its
engine more than ``--ray-max-retries`` times is dropped; with no actor left the run stops, naming why.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import socket
import sys
from typing import Any, Callable, Iterator

from ..format import layout
from ..format.errors import LogitcacheError
from ..format.manifest import ShardRecord
from ..store.commit import FAULT_ENV

log = logging.getLogger(__name__)

# Test hook (LOGITCACHE_FAULT=ray-exit-after-publish:<shard>): the actor process exits after it
# published that shard and before its record reaches the driver, on the shard's first attempt only.
EXIT_AFTER_PUBLISH = "ray-exit-after-publish:"
# Test hook (LOGITCACHE_FAULT=ray-exit-on-load): every actor process exits while it loads its engine.
EXIT_ON_LOAD = "ray-exit-on-load"


def import_ray():
    try:
        import ray
    except ImportError:
        raise LogitcacheError("--executor ray: Ray is not installed (pip install 'logitcache[ray]')") from None
    return ray


def check_reachable(address: str, flag: str, timeout: float = 10.0) -> None:
    """Refuse an address ``HOST:PORT`` or ``ray://HOST:PORT`` where nothing answers (``ray.init`` would
    retry for minutes); other forms (``auto``, ``local``) are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise LogitcacheError(f"{flag} {address}: nothing answers there ({type(e).__name__}: {e}); is the Ray head "
                              "running (`ray start --head`) and the port open?") from None


@dataclasses.dataclass
class RayCluster:
    """A connection to a Ray cluster and the shape of the actors to start on it."""

    ray: Any
    job: Any                   # the CaptureJob, with --device auto resolved to the actors' device
    address: str
    actors: int                # how many to start (fewer when fewer shards are pending)
    gpus_per_actor: float
    cpus_per_actor: float
    fits_now: int              # actors the cluster's resources hold at the start
    started_here: bool         # we started Ray (or connected), so we shut it down

    @classmethod
    def connect(cls, job) -> "RayCluster":
        """Connect to ``--ray-address`` / ``$RAY_ADDRESS``, else start a local Ray with this machine's
        CPUs (and GPUs); reuse the process's Ray when it is connected already (Python users, tests)."""
        ray = import_ray()
        if job.ray_address:
            check_reachable(job.ray_address, "--ray-address")
        started = not ray.is_initialized()
        if started:
            address = job.ray_address or os.environ.get("RAY_ADDRESS") or "local"
            flag = "--ray-address" if job.ray_address else "$RAY_ADDRESS" if address != "local" else "--executor ray"
            if not job.ray_address:
                check_reachable(address, flag)
            extra = {"include_dashboard": False} if address == "local" else {}
            try:
                ray.init(address=address, logging_level=logging.WARNING, **extra)
            except Exception as e:       # ConnectionError, ValueError, RuntimeError: Ray names the cause
                raise LogitcacheError(f"{flag} {address}: cannot connect to a Ray cluster "
                                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        else:
            address = "the Ray this process is connected to"
            if job.ray_address:
                log.warning("--ray-address %s ignored: this process is connected to Ray already", job.ray_address)
        try:
            return cls._shape(ray, job, address, started)
        except BaseException:
            if started:
                ray.shutdown()
            raise

    @classmethod
    def _shape(cls, ray, job, address: str, started: bool) -> "RayCluster":
        res = ray.cluster_resources()
        cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
        gpus_per = job.ray_gpus_per_actor
        if gpus_per is None:
            gpus_per = float(job.tensor_parallel_size) if gpus > 0 else 0.0
        cpus_per = job.ray_cpus_per_actor
        if gpus_per > gpus:
            raise LogitcacheError(f"--ray-gpus-per-actor {gpus_per:g}: the Ray cluster ({address}) has {gpus:g} GPU(s) "
                                  f"and {cpus:g} CPU(s); use 0 to run the engines on CPUs")
        if cpus_per > cpus:
            raise LogitcacheError(f"--ray-cpus-per-actor {cpus_per:g}: the Ray cluster ({address}) has {cpus:g} CPU(s)")
        fits = int(gpus // gpus_per) if gpus_per > 0 else int(cpus // cpus_per)
        device = job.device
        if device == "auto":
            device = "cuda" if gpus_per > 0 else "cpu"
        where = "a new local Ray" if address == "local" else address
        return cls(ray, dataclasses.replace(job, device=device), where, job.ray_actors or max(fits, 1), gpus_per,
                   cpus_per, fits, started)

    def start(self, plan, make_engine: Callable) -> "RayShards":
        """Actors for ``plan``'s pending shards; each builds its engine with ``make_engine(job, plan, where)``
        (capture.engine_for_plan: an object with ``plan`` and ``capture(j)``)."""
        return RayShards(self, plan, make_engine)

    def close(self) -> None:
        if self.started_here:
            self.ray.shutdown()


class ShardActor:
    """One engine on a Ray worker: loads it on the first call (again after Ray restarted the actor)
    and captures the shards the driver sends. Run by Ray as ``ray.remote(...)(ShardActor)``."""

    def __init__(self, job, make_engine: Callable, fault: str | None):
        sys.stdout = sys.stderr            # the driver's stdout carries --json; engines print freely
        if fault:
            os.environ[FAULT_ENV] = fault  # the driver's test hooks reach actors on other machines too
        self.job, self.make_engine, self.fault, self.engine = job, make_engine, fault, None
        self.host = f"{socket.gethostname()} (pid {os.getpid()})"

    def ready(self, plan_ref: list) -> str:
        """Load the engine if this process has none yet. ``plan_ref``: [the plan's object reference]
        (in a list, so that Ray does not fetch the plan for calls that do not need it)."""
        if self.engine is None:
            import ray

            if self.fault == EXIT_ON_LOAD:
                os._exit(1)

            self.engine = self.make_engine(self.job, ray.get(plan_ref[0]), f"Ray worker {self.host}")
        return self.host

    def capture(self, plan_ref: list, j: int, attempt: int) -> tuple[ShardRecord, list]:
        self.ready(plan_ref)
        cfs = self.engine.plan.cfs
        if not cfs.exists(layout.part_path(self.engine.plan.part.part.worker_index)):
            raise LogitcacheError(f"{cfs.url}: the Ray worker {self.host} does not see this cache (its part manifest "
                                  "is missing there): on a cluster, write to storage every node reaches (s3://, gs://, "
                                  "a shared file system)")
        record, skipped = self.engine.capture(j)
        if self.fault == EXIT_AFTER_PUBLISH + record.name and attempt == 0:
            os._exit(1)
        return record, skipped


class RayShards:
    """The driver's side: actors pull the next pending shard when free (a slow or late actor takes
    fewer); a failed shard is queued again. ``run`` yields each shard's record for the driver to commit."""

    def __init__(self, cluster: RayCluster, plan, make_engine: Callable):
        ray = self.ray = cluster.ray
        self.plan, self.cluster = plan, cluster
        self.shipped = ray.put(dataclasses.replace(plan, tokenizer=None))   # fetched by each engine
        actor_class = ray.remote(num_cpus=cluster.cpus_per_actor, num_gpus=cluster.gpus_per_actor,
                                 max_restarts=-1, max_task_retries=0)(ShardActor)
        n = min(cluster.actors, len(plan.todo))
        if cluster.job.progress:
            more = (f"; {n - cluster.fits_now} wait for resources" if n > cluster.fits_now else "")
            print(f"ray: {n} actor(s) of {cluster.cpus_per_actor:g} CPU, {cluster.gpus_per_actor:g} GPU on "
                  f"{cluster.address}{more}", file=sys.stderr)
        self.actors = [actor_class.remote(cluster.job, make_engine, os.environ.get(FAULT_ENV)) for _ in range(n)]
        self.running: dict = {a.ready.remote([self.shipped]): (a, None) for a in self.actors}   # ref -> (actor, shard or None)
        self.idle: list = []                       # actors with a loaded engine and nothing to do
        self.pending = collections.deque(plan.todo)
        self.attempts: collections.Counter = collections.Counter()   # failed attempts per shard
        self.load_deaths: collections.Counter = collections.Counter()   # per actor: deaths while loading its engine
        self.failures: list[str] = []
        try:
            while not self.idle:                   # like the local executor: nothing is written before
                self._next()                       # an engine has loaded
        except BaseException:
            self.close()
            raise

    def _next(self):
        """Wait for one call to end; returns (shard, result) for a captured shard, else None (an actor
        became free, or failed and was dealt with)."""
        ray = self.ray
        from ray.exceptions import ActorUnavailableError, RayError, RayTaskError

        if not self.running:
            raise LogitcacheError("--executor ray: no actor is left to capture the remaining shards ("
                                  + "; ".join(self.failures[-3:]) + ")")
        [ref], _ = ray.wait(list(self.running), num_returns=1)
        actor, j = self.running.pop(ref)
        try:
            result = ray.get(ref)
        except RayTaskError as e:               # the call raised; the actor lives on
            cause = e.cause if e.cause is not None else e
            if isinstance(cause, LogitcacheError):
                raise cause from None            # deterministic: retrying would only repeat it
            why = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
            if j is None:                        # its engine failed to load: the actor is dropped
                self.failures.append(f"an actor's engine failed to load ({why})")
                log.warning("dropping a Ray actor: %s", self.failures[-1])
                ray.kill(actor)
                return None
            self._retry(j, why)
            self.idle.append(actor)
            return None
        except RayError as e:                   # the process died (killed, preempted, out of memory, node lost)
            if isinstance(e, ActorUnavailableError):
                ray.kill(actor, no_restart=False)   # make sure it is not still writing before a retry
            if j is not None:
                self._retry(j, f"its actor died ({type(e).__name__})")
            if getattr(e, "actor_init_failed", False):
                self.failures.append(f"an actor could not start ({type(e).__name__})")
                return None
            if j is None:                        # it died loading its engine: out of memory, a broken node...
                self.load_deaths[actor] += 1
                n = self.load_deaths[actor]
                if n > self.cluster.job.ray_max_retries:   # ...again and again: restarting it would never end
                    self.failures.append(f"an actor died {n} time{'s' if n > 1 else ''} while loading its engine "
                                         f"({type(e).__name__}; more than --ray-max-retries)")
                    log.warning("dropping a Ray actor: %s", self.failures[-1])
                    ray.kill(actor, no_restart=True)
                    return None
            self.running[actor.ready.remote([self.shipped])] = (actor, None)   # back once Ray has restarted it
            return None
        self.idle.append(actor)
        return None if j is None else (j, result)

    def _retry(self, j: int, why: str) -> None:
        name = layout.shard_name(self.plan.input.key, j)
        self.attempts[j] += 1
        self.failures.append(f"shard {name}: {why}")
        if self.attempts[j] > self.cluster.job.ray_max_retries:
            n = self.attempts[j]
            raise LogitcacheError(f"shard {name} failed {n} time{'s' if n > 1 else ''} (last: {why}); the shards "
                                  "recorded so far are kept: run the same command again to resume (or raise "
                                  "--ray-max-retries)")
        log.warning("shard %s: %s; trying it again (attempt %d)", name, why, self.attempts[j] + 1)
        self.pending.appendleft(j)

    def run(self, bar) -> Iterator[tuple[ShardRecord, list]]:
        """Every pending shard, captured and published by some actor, in the order they finish."""
        in_flight = 0
        while self.pending or in_flight:
            while self.pending and self.idle:
                j = self.pending.popleft()
                actor = self.idle.pop(0)
                self.running[actor.capture.remote([self.shipped], j, self.attempts[j])] = (actor, j)
            done = self._next()
            in_flight = sum(j is not None for _, j in self.running.values())
            if done is not None:
                record, skipped = done[1]
                if bar is not None:
                    bar.update(record.tokens)
                yield record, skipped

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
