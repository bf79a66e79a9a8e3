"""Bearer-key authentication with a short-lived cache in front of the key table.

A positive entry lives `ttl_s` (so a revocation on another replica takes effect within it; on
this replica at once); unknown keys are cached briefly too, so a flood of bad keys cannot turn
into a flood of database reads."""

from __future__ import annotations

import hmac
import time

from margin.domain import VirtualKey
from margin.gateway.errors import GatewayError, Unauthorized
from margin.ledger.keys import hash_secret, row_to_key
from margin.ledger.store import Store, StoreUnavailable

_NEGATIVE_TTL_S = 1.0


class KeyRing:
    def __init__(self, store: Store, ttl_s: float = 5.0):
        self.store = store
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[VirtualKey | None, float]] = {}

    def forget(self, key_id: str | None = None) -> None:
        if key_id is None:
            self._cache.clear()
            return
        for secret, (k, _) in list(self._cache.items()):
            if k is not None and k.key_id == key_id:
                del self._cache[secret]

    async def lookup(self, secret: str) -> VirtualKey | None:
        # Keyed by the secret itself: a cache hit skips the SHA-256 (the process holds the
        # secret in memory for the request anyway; only hashes ever reach storage).
        now = time.monotonic()
        hit = self._cache.get(secret)
        if hit is not None and hit[1] > now:
            return hit[0]
        try:
            row = await self.store.key_by_hash(hash_secret(secret))
        except StoreUnavailable:
            if hit is not None and hit[0] is not None:
                return hit[0]  # stale but known: keep serving through a database outage
            raise KeyStoreUnavailable(
                "The key store is unavailable and this key is not cached; retry shortly") from None
        key = row_to_key(row) if row else None
        self._cache[secret] = (key, now + (self.ttl_s if key else _NEGATIVE_TTL_S))
        if len(self._cache) > 100_000:  # bound memory under a key-guessing flood
            self._cache.clear()
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
            raise Unauthorized(f"Incorrect API key provided: {secret[:6]}...; create one with `margin keys create`")
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
