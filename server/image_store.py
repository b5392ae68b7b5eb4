"""Where `response_format=url` results live until they expire: in memory, or in Redis for many replicas."""

from __future__ import annotations

import threading
import time
import uuid


class LocalImageStore:
    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._files: dict[str, tuple[float, str, bytes]] = {}  # id -> (expires_at, mime type, bytes)

    async def put(self, data: bytes, mime_type: str) -> str:
        file_id = uuid.uuid4().hex
        now = time.monotonic()
        with self._lock:
            self._files = {k: v for k, v in self._files.items() if v[0] > now}  # drop the expired ones
            self._files[file_id] = (now + self.ttl_s, mime_type, data)
        return file_id

    async def get(self, file_id: str) -> tuple[str, bytes] | None:
        with self._lock:
            entry = self._files.get(file_id)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1], entry[2]


class RedisImageStore:
    """Any API replica serves a url another replica handed out."""

    def __init__(self, redis, prefix: str, ttl_s: int):
        self.redis = redis  # redis.asyncio.Redis
        self.prefix = prefix
        self.ttl_s = ttl_s

    async def put(self, data: bytes, mime_type: str) -> str:
        file_id = uuid.uuid4().hex
        await self.redis.hset(f"{self.prefix}:file:{file_id}", mapping={"mime": mime_type, "data": data})
        await self.redis.expire(f"{self.prefix}:file:{file_id}", self.ttl_s)
        return file_id

    async def get(self, file_id: str) -> tuple[str, bytes] | None:
        entry = await self.redis.hgetall(f"{self.prefix}:file:{file_id}")
        if not entry:
            return None
        return entry[b"mime"].decode(), entry[b"data"]
