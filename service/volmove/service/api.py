"""The service's HTTP API (JSON over HTTP/1.1; see docs/FLEET.md).

Plain HTTP serves the CLI and tests best: a request gets exactly one answer
with a status code, ``curl`` can drive it, and ``/v1/watch`` streams job
changes as newline-delimited JSON for live progress.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from volmove.core.errors import (
    AuthError,
    ConflictError,
    NotFoundError,
    UnreachableError,
    UsageError,
    VolmoveError,
)
from volmove.core.fleet.jobs import TERMINAL, Job
from volmove.service.engine import Engine, Watch

JSON = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STATUS = {UsageError: 400, AuthError: 401, NotFoundError: 404, ConflictError: 409, UnreachableError: 503}
RECENT = 3600.0  # finished jobs listed by default for this long


def error_status(exc: VolmoveError) -> int:
    return next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 500 if exc.kind != "protocol" else 400)


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.json_response(doc, status=status, dumps=lambda d: json.dumps(d, default=str))


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except VolmoveError as exc:
        return _json({"error": {"kind": exc.kind, "message": exc.message}}, error_status(exc))


def auth(token: str | None) -> Any:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token and not hmac.compare_digest(given.encode(), token.encode()):
            raise AuthError("the volmove service refused the token (set VOLMOVE_SERVICE_TOKEN)")
        return await handler(request)
    return check


async def _body(request: web.Request) -> JSON:
    try:
        body = await request.json()
    except ValueError:
        raise UsageError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise UsageError("the request body must be a JSON object")
    return body


class Api:
    def __init__(self, engine: Engine, broker_connected: Callable[[], bool]) -> None:
        self.engine = engine
        self.broker_connected = broker_connected

    def app(self, token: str | None = None) -> web.Application:
        app = web.Application(middlewares=[errors, auth(token)])
        app.add_routes([
            web.get("/v1/health", self.health),
            web.get("/v1/hosts", self.hosts),
            web.get("/v1/hosts/{name}", self.host),
            web.get("/v1/jobs", self.jobs),
            web.post("/v1/jobs", self.submit),
            web.get("/v1/jobs/{id}", self.job),
            web.post("/v1/jobs/{id}/cancel", self.cancel),
            web.post("/v1/migrations", self.migrate),
            web.get("/v1/watch", self.watch),
        ])
        return app

    async def health(self, _request: web.Request) -> web.Response:
        return _json({"ok": True, "broker": self.broker_connected()})

    async def hosts(self, _request: web.Request) -> web.Response:
        active = [j for j in self.engine.jobs.values() if not j.terminal and j.kind != "migrate"]
        docs = []
        for name in sorted(self.engine.hosts):
            doc = self.engine.hosts[name].as_dict(with_inventory=False)
            doc["jobs_active"] = sum(1 for j in active if j.host == name)
            docs.append(doc)
        return _json({"hosts": docs})

    async def host(self, request: web.Request) -> web.Response:
        return _json(self.engine.host(request.match_info["name"]).as_dict(with_inventory=True))

    async def jobs(self, request: web.Request) -> web.Response:
        q = request.query
        everything, children = q.get("all") == "1", q.get("children") == "1"
        since = self.engine.clock() - RECENT
        selected = [j for j in self.engine.jobs.values()
                    if (children or j.parent is None) and (q.get("host") in (None, j.host))
                    and (everything or not j.terminal or j.updated >= since)]
        selected.sort(key=lambda j: j.created, reverse=True)
        limit = int(q.get("limit", "200")) if q.get("limit", "200").isdigit() else 200
        return _json({"jobs": [j.as_dict() for j in selected[:limit]]})

    async def job(self, request: web.Request) -> web.Response:
        job = self.engine.job(request.match_info["id"])
        return _json(self._with_children(job))

    def _with_children(self, job: Job) -> JSON:
        doc = job.as_dict()
        if job.kind == "migrate":
            doc["children"] = [c.as_dict() for c in self.engine.children(job.id)]
        return doc

    async def submit(self, request: web.Request) -> web.Response:
        b = await _body(request)
        kind, host, params = _str(b, "kind"), _str(b, "host"), b.get("params") or {}
        deadline, attempts = _opt_num(b, "deadline_s"), _opt_num(b, "max_attempts")
        job = await self.engine.call(lambda now: self.engine.submit(
            kind, host, params, now, deadline_s=deadline, max_attempts=int(attempts) if attempts else None))
        return _json(job.as_dict(), 201)

    async def cancel(self, request: web.Request) -> web.Response:
        job_id = request.match_info["id"]
        job = await self.engine.call(lambda now: self.engine.cancel(job_id, now))
        return _json(job.as_dict())

    async def migrate(self, request: web.Request) -> web.Response:
        b = await _body(request)
        volume, target, source = _str(b, "volume"), _str(b, "to"), b.get("from") or None
        if source is not None and not isinstance(source, str):
            raise UsageError("'from' must be a host name")
        force, remove = bool(b.get("force", False)), bool(b.get("remove_source", False))
        job = await self.engine.call(lambda now: self.engine.migrate(volume, target, source, now, force=force,
                                                                     remove_source=remove))
        return _json(self._with_children(job), 201)

    async def watch(self, request: web.Request) -> web.StreamResponse:
        """Newline-delimited JSON: the current state, then every change; ends when a watched job ends."""
        job_id = request.query.get("job")
        first = [self.engine.job(job_id)] if job_id else []
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        watch = Watch(job_id)
        self.engine.watches.add(watch)
        try:
            for job in first:
                watch.push(job)
            while True:
                docs = await watch.take()
                await response.write("".join(json.dumps(d, default=str) + "\n" for d in docs).encode())
                if job_id and any(d["id"] == job_id and d["phase"] in TERMINAL for d in docs):
                    break
        finally:
            self.engine.watches.discard(watch)
        await response.write_eof()
        return response


def _str(body: JSON, key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise UsageError(f"'{key}' is required")
    return value


def _opt_num(body: JSON, key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise UsageError(f"'{key}' must be a positive number")
    return float(value)
