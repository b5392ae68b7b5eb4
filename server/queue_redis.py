"""The Redis Streams job queue: API replicas and workers on any host meet in one Redis.

Keys under the prefix P:
  P:jobs            stream of jobs; consumer group "workers". Entries are deleted once acknowledged,
                    so its length is the number of unfinished jobs (the 429 bound).
  P:events:<job>    stream of one job's events (previews, then one terminal result or failure);
                    any API replica can read it from the start. Expires after the result TTL.
  P:done:<job>      set together with the terminal event, so a job re-run after its worker died
                    stores its result once.
  P:cancel          stream of cancelled job ids, read by every worker; P:cancelled:<job> marks a job
                    cancelled before any worker claimed it.
  P:dead            dead-letter stream: jobs that do not parse, or were delivered max_deliveries times.
A worker heartbeats its jobs (XCLAIM JUSTID resets their idle time); jobs idle longer than
claim_idle_s belong to a dead worker and are taken over with XAUTOCLAIM.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import redis
import redis.asyncio as aioredis

from .jobs import (
    FailedEvent,
    JobEvent,
    JobFormatError,
    JobSpec,
    PreviewEvent,
    ResultEvent,
    event_from_json,
    event_to_json,
)
from .metrics import ServerMetrics
from .queues import QueueFullError, QueueUnavailableError

log = logging.getLogger(__name__)

GROUP = "workers"
CANCEL_STREAM_LENGTH = 10_000

# KEYS: jobs stream. ARGV: bound, job json.
ENQUEUE_SCRIPT = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('XADD', KEYS[1], '*', 'job', ARGV[2])
return 1
"""

# KEYS: done marker, job events, jobs stream. ARGV: event json, ttl, group, entry id ('' if none).
FINISH_SCRIPT = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  redis.call('XADD', KEYS[2], '*', 'event', ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
if ARGV[4] ~= '' then
  redis.call('XACK', KEYS[3], ARGV[3], ARGV[4])
  redis.call('XDEL', KEYS[3], ARGV[4])
end
return 1
"""


class RedisKeys:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.jobs = f"{prefix}:jobs"
        self.cancel = f"{prefix}:cancel"
        self.dead = f"{prefix}:dead"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    def done(self, job_id: str) -> str:
        return f"{self.prefix}:done:{job_id}"

    def cancelled(self, job_id: str) -> str:
        return f"{self.prefix}:cancelled:{job_id}"


def ensure_group(client: redis.Redis, keys: RedisKeys) -> None:
    try:
        client.xgroup_create(keys.jobs, GROUP, id="0", mkstream=True)
    except redis.ResponseError as err:
        if "BUSYGROUP" not in str(err):
            raise


class RedisSubscription:
    """Reads one job's event stream from its start; a re-run job's repeated previews are skipped."""

    def __init__(self, client: aioredis.Redis, key: str):
        self.client = client
        self.key = key
        self.last_id = "0-0"
        self.seen_previews: set[tuple[int, int]] = set()

    async def next(self, timeout_s: float) -> JobEvent | None:
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            reply = await self.client.xread({self.key: self.last_id}, count=1, block=max(1, int(remaining * 1000)))
            if not reply:
                return None
            entry_id, fields = reply[0][1][0]
            self.last_id = entry_id
            event = event_from_json(fields[b"event"])
            if isinstance(event, PreviewEvent):
                marker = (event.image_index, event.partial_index)
                if marker in self.seen_previews:
                    continue
                self.seen_previews.add(marker)
            return event
        return None

    def close(self) -> None:
        pass


class RedisApiQueue:
    """The API side: enqueue within the bound, read events, publish cancellations."""

    def __init__(self, url: str, prefix: str, max_jobs: int, ttl_s: int):
        self.client = aioredis.Redis.from_url(url)
        self.keys = RedisKeys(prefix)
        self.max_jobs = max_jobs
        self.ttl_s = ttl_s
        self._enqueue = self.client.register_script(ENQUEUE_SCRIPT)
        self._tasks: set[asyncio.Task] = set()
        with redis.Redis.from_url(url) as setup:
            ensure_group(setup, self.keys)

    async def submit(self, spec: JobSpec) -> None:
        try:
            accepted = await self._enqueue(keys=[self.keys.jobs], args=[self.max_jobs, spec.to_json()])
        except (redis.RedisError, OSError) as err:
            raise QueueUnavailableError(f"Redis: {err}") from err
        if not accepted:
            raise QueueFullError(f"{self.max_jobs} jobs are queued or running; retry later")

    def subscribe(self, job_id: str) -> RedisSubscription:
        return RedisSubscription(self.client, self.keys.events(job_id))

    def cancel(self, job_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._cancel(job_id))
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)

    async def _cancel(self, job_id: str) -> None:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.set(self.keys.cancelled(job_id), 1, ex=self.ttl_s)
                pipe.xadd(self.keys.cancel, {"job_id": job_id}, maxlen=CANCEL_STREAM_LENGTH, approximate=True)
                await pipe.execute()
        except redis.RedisError:
            log.exception("could not publish the cancellation of job %s", job_id)

    async def depth(self) -> int:
        return await self.client.xlen(self.keys.jobs)

    async def ready(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (redis.RedisError, OSError):
            return False

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.aclose()


class RedisWorkerQueue:
    """The worker side: claim (new jobs, then dead workers' jobs), publish, finish exactly once, heartbeat."""

    def __init__(
        self,
        url: str,
        prefix: str,
        consumer: str,
        claim_idle_s: float,
        max_deliveries: int,
        ttl_s: int,
        metrics: ServerMetrics,
    ):
        self.client = redis.Redis.from_url(url)
        self.keys = RedisKeys(prefix)
        self.consumer = consumer
        self.claim_idle_s = claim_idle_s
        self.max_deliveries = max_deliveries
        self.ttl_s = ttl_s
        self.metrics = metrics
        self._finish = self.client.register_script(FINISH_SCRIPT)
        self._lock = threading.Lock()
        self.entry_ids: dict[str, bytes] = {}  # job id -> its entry in the jobs stream, while we hold it
        self.last_cancel_id = f"{int(time.time() * 1000)}-0"
        self.next_reclaim = 0.0
        ensure_group(self.client, self.keys)
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="nextstep-heartbeat", daemon=True)
        self._heartbeat.start()

    def claim(self, max_jobs: int, block_s: float) -> list[JobSpec]:
        jobs: list[JobSpec] = []
        if time.monotonic() >= self.next_reclaim:
            self.next_reclaim = time.monotonic() + self.claim_idle_s / 2
            jobs += self._reclaim(max_jobs)
        if len(jobs) < max_jobs:
            wait = {"block": max(1, int(block_s * 1000))} if block_s > 0 and not jobs else {}
            reply = self.client.xreadgroup(
                GROUP, self.consumer, {self.keys.jobs: ">"}, count=max_jobs - len(jobs), **wait
            )
            for _, entries in reply or []:
                jobs += [spec for entry_id, fields in entries if (spec := self._accept(entry_id, fields, 1))]
        return jobs

    def _reclaim(self, max_jobs: int) -> list[JobSpec]:
        idle_ms = int(self.claim_idle_s * 1000)
        _, entries, _ = self.client.xautoclaim(self.keys.jobs, GROUP, self.consumer, idle_ms, "0-0", count=max_jobs)
        jobs = []
        for entry_id, fields in entries:
            pending = self.client.xpending_range(self.keys.jobs, GROUP, min=entry_id, max=entry_id, count=1)
            deliveries = pending[0]["times_delivered"] if pending else 1
            log.warning("reclaimed job entry %s from a silent worker (delivery %d)", entry_id, deliveries)
            if spec := self._accept(entry_id, fields, deliveries):
                jobs.append(spec)
        return jobs

    def _accept(self, entry_id: bytes, fields: dict, deliveries: int) -> JobSpec | None:
        raw = fields.get(b"job", b"")
        try:
            spec = JobSpec.from_json(raw)
        except JobFormatError as err:
            self._dead_letter(entry_id, raw, str(err), None, deliveries)
            return None
        if deliveries > self.max_deliveries:
            reason = f"delivered {deliveries} times without finishing; the workers that took it died"
            self._dead_letter(entry_id, raw, reason, spec.job_id, deliveries)
            return None
        if self.client.exists(self.keys.done(spec.job_id), self.keys.cancelled(spec.job_id)):
            self._ack(entry_id)  # finished by an earlier delivery, or cancelled before it started
            return None
        with self._lock:
            self.entry_ids[spec.job_id] = entry_id
        return spec

    def _dead_letter(self, entry_id: bytes, raw: bytes, reason: str, job_id: str | None, deliveries: int) -> None:
        log.error("dead-lettering job entry %s: %s", entry_id, reason)
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.keys.dead, {"job": raw, "reason": reason, "deliveries": deliveries, "consumer": self.consumer})
        if job_id is not None:
            failed = FailedEvent(f"the job could not be completed: {reason}", False, "dead_letter")
            keys = [self.keys.done(job_id), self.keys.events(job_id), self.keys.jobs]
            self._finish(keys=keys, args=[event_to_json(failed), self.ttl_s, GROUP, entry_id], client=pipe)
        else:
            pipe.xack(self.keys.jobs, GROUP, entry_id)
            pipe.xdel(self.keys.jobs, entry_id)
        pipe.execute()
        self.metrics.job_failures.labels(reason="dead_letter").inc()

    def publish(self, job_id: str, event: PreviewEvent) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(self.keys.events(job_id), {"event": event_to_json(event)})
        pipe.expire(self.keys.events(job_id), self.ttl_s)
        pipe.execute()

    def finish(self, job_id: str, event: ResultEvent | FailedEvent) -> None:
        with self._lock:
            entry_id = self.entry_ids.pop(job_id, b"")
        keys = [self.keys.done(job_id), self.keys.events(job_id), self.keys.jobs]
        self._finish(keys=keys, args=[event_to_json(event), self.ttl_s, GROUP, entry_id])

    def drop(self, job_id: str) -> None:
        with self._lock:
            entry_id = self.entry_ids.pop(job_id, None)
        if entry_id is not None:
            self._ack(entry_id)

    def cancelled(self, job_ids: set[str]) -> set[str]:
        reply = self.client.xread({self.keys.cancel: self.last_cancel_id}, count=1000)
        hits = set()
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self.last_cancel_id = entry_id
                job_id = fields.get(b"job_id", b"").decode(errors="replace")
                if job_id in job_ids:
                    hits.add(job_id)
        return hits

    def _ack(self, entry_id: bytes) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.keys.jobs, GROUP, entry_id)
        pipe.xdel(self.keys.jobs, entry_id)
        pipe.execute()

    def _beat(self) -> None:
        """Reset the idle time of the jobs we hold, so no other worker takes them over."""
        while not self._stop.wait(self.claim_idle_s / 3):
            with self._lock:
                entry_ids = list(self.entry_ids.values())
            if not entry_ids:
                continue
            try:
                self.client.xclaim(self.keys.jobs, GROUP, self.consumer, 0, entry_ids, justid=True)
            except redis.RedisError:
                log.exception("heartbeat failed")

    def close(self) -> None:
        self._stop.set()
        self._heartbeat.join(timeout=5)
        self.client.close()
