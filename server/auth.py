"""Optional bearer-token auth for /v1/*: keys compared in constant time, all of them every time."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from .errors import ApiError


def _digest(key: str) -> bytes:
    # equal-length digests, so the comparison time says nothing about a key's length either
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ApiKeyCheck:
    def __init__(self, keys: tuple[str, ...]):
        self.digests = [_digest(key) for key in keys]

    def __call__(self, request: Request) -> None:
        if not self.digests:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "Missing API key: send 'Authorization: Bearer KEY'.", code="missing_api_key")
        offered = _digest(token.strip())
        matches = [hmac.compare_digest(offered, digest) for digest in self.digests]
        if not any(matches):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
