"""Bearer-key authentication with a short-lived cache in front of the key table.

Only the SHA-256 of a secret is stored, and the cache is keyed by that digest too, so the process
never indexes anything by the secret itself; the stored hash is compared with the computed one in
constant time. A cached key is re-read from the store once it is `REVALIDATE_S` old, so a
revocation on any replica takes effect on every other within about half a second (the guarantee
is 1 s); concurrent requests with the same key share one store read. A known key keeps working
while the store is down (stale-while-error), and unknown keys are cached briefly too, so a flood
of bad keys cannot turn into a flood of database reads."""

from __future__ import annotations

import asyncio
import hmac
import time

from margin.domain import VirtualKey
from margin.gateway.errors import Forbidden, GatewayError, Unauthorized
from margin.ledger.keys import hash_secret, row_to_key
from margin.ledger.store import Store, StoreUnavailable

_NEGATIVE_TTL_S = 1.0
REVALIDATE_S = 0.5  # the longest a cached key is trusted before the store is asked again
_MAX_ENTRIES = 100_000


class KeyRing:
    def __init__(self, store: Store, ttl_s: float = 5.0):
        self.store = store
        # key_cache_ttl_s may only shorten the revocation bound, never stretch it past 1 s.
        self.ttl_s = min(ttl_s, REVALIDATE_S)
        self._cache: dict[str, tuple[VirtualKey | None, float]] = {}  # digest -> (key, fresh until)
        self._inflight: dict[str, asyncio.Future[VirtualKey | None]] = {}

    def forget(self, key_id: str | None = None) -> None:
        if key_id is None:
            self._cache.clear()
            return
        for digest, (k, _) in list(self._cache.items()):
            if k is not None and k.key_id == key_id:
                del self._cache[digest]

    async def lookup(self, secret: str) -> VirtualKey | None:
        digest = hash_secret(secret)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        pending = self._inflight.get(digest)
        if pending is not None:  # another request is already asking the store for this key
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                if pending.cancelled():  # the asking request went away, not this one: ask again
                    return await self.lookup(secret)
                raise
        fut: asyncio.Future[VirtualKey | None] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = fut
        try:
            key = await self._read(digest, hit)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        else:
            fut.set_result(key)
        finally:
            del self._inflight[digest]
        return key

    async def _read(self, digest: str, hit: tuple[VirtualKey | None, float] | None) -> VirtualKey | None:
        try:
            row = await self.store.key_by_hash(digest)
        except StoreUnavailable:
            if hit is not None and hit[0] is not None:
                return hit[0]  # stale but known: keep serving through a database outage
            raise KeyStoreUnavailable(
                "The key store is unavailable and this key is not cached; retry shortly") from None
        key = row_to_key(row) if row else None
        if key is not None and not hmac.compare_digest(key.key_hash.encode(), digest.encode()):
            key = None  # a store that matched loosely (collation, trailing spaces) must not let a key in
        if len(self._cache) >= _MAX_ENTRIES:  # bound memory under a key-guessing flood
            self._cache.clear()
        self._cache[digest] = (key, time.monotonic() + (self.ttl_s if key else _NEGATIVE_TTL_S))
        return key

    async def authenticate(self, authorization: str | None) -> VirtualKey:
        if not authorization:
            raise Unauthorized("Missing API key: send 'Authorization: Bearer <margin key>'")
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Unauthorized("Malformed Authorization header: expected 'Bearer <margin key>'")
        secret = secret.strip()
        key = await self.lookup(secret)
        if key is None:
            # Echo at most 6 printable characters of what was sent: enough to spot a wrong key,
            # never enough to leak one (and nothing that could forge a log line).
            shown = "".join(c for c in secret[:6] if c.isprintable())
            raise Unauthorized(f"Incorrect API key provided: {shown}...; create one with `margin keys create`")
        if not key.active:
            raise RevokedKey(key)
        return key


    async def by_id(self, key_id: str) -> VirtualKey:
        """The current state of a key known by id (internal callers such as the batch lane);
        read from the store each time, so a revocation is seen at once."""
        try:
            row = await self.store.key_by_id(key_id)
        except StoreUnavailable:
            raise KeyStoreUnavailable("The key store is unavailable; retry shortly") from None
        if row is None:
            raise Unauthorized(f"The key {key_id} no longer exists")
        key = row_to_key(row)
        if not key.active:
            raise RevokedKey(key)
        return key


def require_caller(key: VirtualKey) -> VirtualKey:
    """A dashboard viewer key (tag role=viewer) reads its team's spend in /ui; it may not spend."""
    if dict(key.tags).get("role") == "viewer":
        raise Forbidden(f"The key {key.prefix}... ({key.key_id}) is a dashboard viewer key (role=viewer): it can sign "
                        "in to /ui but cannot call models or report outcomes", code="viewer_key")
    return key


class KeyStoreUnavailable(GatewayError):
    status, type, code = 503, "api_error", "key_store_unavailable"


class RevokedKey(Unauthorized):
    """Carries the key, so the refused call is still attributed to whoever held it."""

    def __init__(self, key: VirtualKey):
        super().__init__(f"The API key {key.prefix}... ({key.key_id}) was revoked", code="revoked_api_key")
        self.key = key


def is_admin(authorization: str | None, admin_key: str | None) -> bool:
    if not admin_key or not authorization:
        return False
    scheme, _, secret = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(secret.strip().encode(), admin_key.encode())
