"""Dashboard sessions: a signed, expiring cookie naming who signed in, and CSRF tokens bound to it.

The cookie is `base64(json).base64(HMAC-SHA256)` (stdlib only). It is stateless, so every replica
sharing the secret accepts it: the secret is `MARGIN_UI_SECRET` if set, else derived from the admin
key (rotating the admin key signs everyone out), else random per process (sessions then last until
a restart and do not cross replicas). The cookie never holds a key: an admin session holds a
fingerprint of the admin key it was opened with, a viewer session the id of its key, which is read
again on every request, so revoking the key ends the session at once."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson

COOKIE = "margin_ui"
LOGIN_COOKIE = "margin_ui_login"  # binds the sign-in form's CSRF token before there is a session
TTL_S = 8 * 3600
LOGIN_TTL_S = 1800
VIEWER_TAG = ("role", "viewer")  # a team viewer key is a virtual key with this tag and a team

Role = Literal["admin", "viewer"]


@dataclass(frozen=True, slots=True)
class Session:
    role: Role
    nonce: str  # per sign-in; CSRF tokens derive from it
    expires: int  # epoch seconds
    team: str = ""  # viewer: the only team whose rows it may see
    key_id: str = ""  # viewer: the key it signed in with
    admin_fp: str = ""  # admin: fingerprint of the admin key it signed in with

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def who(self) -> str:
        return "admin" if self.is_admin else f"viewer of team {self.team}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    def __init__(self, secret: bytes):
        if len(secret) < 16:
            raise ValueError("the dashboard session secret must be at least 16 bytes")
        self._secret = secret

    @classmethod
    def for_gateway(cls, admin_key: str | None) -> Signer:
        env = os.environ.get("MARGIN_UI_SECRET", "")
        if env:
            return cls(hashlib.sha256(env.encode()).digest())
        if admin_key:
            return cls(hmac.new(admin_key.encode(), b"margin-ui-session-v1", hashlib.sha256).digest())
        return cls(secrets.token_bytes(32))

    def _mac(self, purpose: str, data: bytes) -> bytes:
        return hmac.new(self._secret, purpose.encode() + b"\x00" + data, hashlib.sha256).digest()

    def sign(self, payload: dict[str, Any], purpose: str = "session") -> str:
        body = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
        return f"{_b64(body)}.{_b64(self._mac(purpose, body))}"

    def unsign(self, token: str, now: float, purpose: str = "session") -> dict[str, Any] | None:
        """The payload if the signature is ours and it has not expired, else None."""
        body_text, _, mac_text = token.partition(".")
        try:
            body, mac = _unb64(body_text), _unb64(mac_text)
        except ValueError:
            return None
        if not hmac.compare_digest(mac, self._mac(purpose, body)):
            return None
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(payload, dict) or not isinstance(payload.get("exp"), int) or payload["exp"] <= now:
            return None
        return payload

    def fingerprint(self, admin_key: str) -> str:
        return self._mac("admin", admin_key.encode()).hex()[:32]

    def csrf(self, nonce: str) -> str:
        return self._mac("csrf", nonce.encode()).hex()[:40]

    def csrf_ok(self, nonce: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf(nonce).encode(), (token or "").encode())

    # -- sessions ---------------------------------------------------------------------------------
    def issue(self, s: Session) -> str:
        return self.sign({"r": s.role, "n": s.nonce, "exp": s.expires, "t": s.team, "k": s.key_id,
                          "a": s.admin_fp})

    def session(self, token: str | None, now: float) -> Session | None:
        if not token:
            return None
        p = self.unsign(token, now)
        if p is None or p.get("r") not in ("admin", "viewer"):
            return None
        return Session(role=p["r"], nonce=str(p.get("n", "")), expires=int(p["exp"]), team=str(p.get("t", "")),
                       key_id=str(p.get("k", "")), admin_fp=str(p.get("a", "")))

    def login_nonce(self, token: str | None, now: float) -> str | None:
        p = self.unsign(token, now, purpose="login") if token else None
        return str(p["n"]) if p else None

    def new_login(self, now: float) -> tuple[str, str]:
        """(cookie value, nonce) for the sign-in form."""
        nonce = secrets.token_urlsafe(16)
        return self.sign({"n": nonce, "exp": int(now) + LOGIN_TTL_S}, purpose="login"), nonce


def is_viewer_key(tags: dict[str, str], team: str) -> bool:
    return tags.get(VIEWER_TAG[0]) == VIEWER_TAG[1] and bool(team)


Lookup = Callable[[str], Awaitable[Any]]  # KeyRing.lookup: secret -> VirtualKey | None (hash compared in constant time)


async def sign_in(secret: str, admin_key: str | None, lookup: Lookup, signer: Signer, now: float) -> Session | str:
    """A session for the admin key or a team viewer key, or the reason sign-in failed."""
    secret = secret.strip()
    if not secret:
        return "Paste the admin key or a team viewer key."
    nonce = secrets.token_urlsafe(16)
    expires = int(now) + TTL_S
    if admin_key and hmac.compare_digest(secret.encode(), admin_key.encode()):
        return Session("admin", nonce, expires, admin_fp=signer.fingerprint(admin_key))
    key = await lookup(secret)
    if key is None or not key.active:
        return "That key is not valid (unknown or revoked)."
    tags = dict(key.tags)
    if not is_viewer_key(tags, key.team):
        return ("That key is a model-call key, not a viewer key: sign in with the admin key, or a key with a team "
                "and the tag role=viewer.")
    return Session("viewer", nonce, expires, team=key.team, key_id=key.key_id)


class SignInThrottle:
    """Failed sign-ins per client address: after `limit` failures within `window_s`, that address
    waits until the oldest one leaves the window. A weak admin key in margin.yaml cannot then be
    guessed at network speed. An attempt counts as failed from the moment it starts (so parallel
    guesses cannot all pass the check while the first is being looked up) and only a successful one
    is taken back: signing in with a viewer key does not wipe the address's earlier failures. Per
    replica and in memory (a restart forgets; bounded to `max_clients` addresses, the least recently
    failing dropped first)."""

    def __init__(self, limit: int = 10, window_s: float = 300.0, max_clients: int = 10_000):
        self.limit, self.window_s, self.max_clients = limit, window_s, max_clients
        self._fails: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str, now: float) -> float | None:
        """Seconds this client must wait before trying again, or None if it may try now."""
        q = self._fails.get(client)
        if q is None:
            return None
        while q and q[0] <= now - self.window_s:
            q.popleft()
        if not q:
            del self._fails[client]
            return None
        return q[0] + self.window_s - now if len(q) >= self.limit else None

    def attempt(self, client: str, now: float) -> None:
        """An attempt begins: counted as a failure unless `succeeded(client, now)` takes it back."""
        q = self._fails.pop(client, None) or deque(maxlen=self.limit)
        q.append(now)
        self._fails[client] = q  # most recent last
        while len(self._fails) > self.max_clients:
            self._fails.popitem(last=False)

    def succeeded(self, client: str, now: float) -> None:
        q = self._fails.get(client)
        if q is not None and now in q:
            q.remove(now)


def cookie(name: str, value: str, max_age: int, secure: bool) -> bytes:
    """HttpOnly (no script reads it), SameSite=Strict (no cross-site request carries it), scoped to /ui."""
    parts = [f"{name}={value}", "Path=/ui", f"Max-Age={max_age}", "HttpOnly", "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts).encode()


def read_cookies(header: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (header or "").split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k and k not in out:
            out[k] = v
    return out
