"""Browser sessions of the web UI, and the one-time login links `vmkit ui` prints.

A session is made by logging in with an API token (or a one-time link) and lives in the daemon's memory only:
a daemon restart forgets every session and the UI shows its login page again. The browser holds the session id
in an HttpOnly cookie and a CSRF secret in a second, script-readable cookie that it echoes in `X-CSRF-Token` on
every state-changing request (the middleware compares it with the session's own copy, in constant time).

Only SHA-256 digests of session ids and link codes are kept, so lookups time nothing secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

SESSION_COOKIE = "vmkit_session"
CSRF_COOKIE = "vmkit_csrf"
CSRF_HEADER = "x-csrf-token"
SESSION_TTL_S = 12 * 3600.0  # a session ends this long after its login, used or not
LINK_TTL_S = 300.0  # a login link printed by `vmkit ui` is good for one use within five minutes
MAX_SESSIONS = 1000  # oldest dropped beyond this
MAX_LINKS = 100


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Session:
    token: str | None  # the API token logged in with; None for a session from a login link (full rights)
    read_only: bool
    csrf: str
    expires_at: float

    def csrf_ok(self, value: str | None) -> bool:
        return value is not None and hmac.compare_digest(value.encode(), self.csrf.encode())


@dataclass(frozen=True)
class LoginLink:
    code: str
    expires_at: float


class Sessions:
    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._links: dict[str, float] = {}

    def create(self, *, token: str | None, read_only: bool) -> tuple[str, Session]:
        """A new session: (its id, for the cookie; the session, whose csrf goes in the other cookie)."""
        self._expire()
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        sid = secrets.token_urlsafe(32)
        session = Session(token, read_only, secrets.token_urlsafe(32), time.time() + SESSION_TTL_S)
        self._sessions[_digest(sid)] = session
        return sid, session

    def get(self, sid: str) -> Session | None:
        session = self._sessions.get(_digest(sid))
        if session is not None and session.expires_at <= time.time():
            self.end(sid)
            return None
        return session

    def end(self, sid: str) -> None:
        self._sessions.pop(_digest(sid), None)

    def link(self) -> LoginLink:
        """A one-time login code (for a URL fragment: it never reaches a server log or a Referer)."""
        self._expire()
        while len(self._links) >= MAX_LINKS:
            del self._links[next(iter(self._links))]
        code = secrets.token_urlsafe(24)
        expires = time.time() + LINK_TTL_S
        self._links[_digest(code)] = expires
        return LoginLink(code, expires)

    def redeem(self, code: str) -> bool:
        """True once per valid, unexpired code."""
        expires = self._links.pop(_digest(code), None)
        return expires is not None and expires > time.time()

    def _expire(self) -> None:
        now = time.time()
        for key in [k for k, s in self._sessions.items() if s.expires_at <= now]:
            del self._sessions[key]
        for key in [k for k, e in self._links.items() if e <= now]:
            del self._links[key]
