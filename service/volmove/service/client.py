"""A client of the service's HTTP API, for the CLI and tests.

aiohttp errors are translated here: a service that does not answer is
UnreachableError; an error answer becomes the volmove error of its kind.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any, Self

import aiohttp

from volmove.core import errors as E

JSON = dict[str, Any]
SERVICE_ENV = "VOLMOVE_SERVICE"
TOKEN_ENV = "VOLMOVE_SERVICE_TOKEN"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
_KINDS: dict[str, type[E.VolmoveError]] = {
    cls.kind: cls for cls in (E.UsageError, E.NotFoundError, E.ConflictError, E.UnreachableError, E.AuthError,
                              E.CorruptDataError, E.UnsafeDataError, E.RepositoryError, E.StorageError,
                              E.DockerError, E.JobFailedError, E.CancelledByUser)
}


def error_of(kind: str, message: str) -> E.VolmoveError:
    """The volmove error for a kind named in an answer or a job's error (unknown kinds: JobFailedError)."""
    return _KINDS.get(kind, E.JobFailedError)(message)


def job_error(job: JSON) -> E.VolmoveError:
    """The error a failed or cancelled job stands for, naming the job and its host."""
    err = job.get("error") or {}
    message = f"job {job['id']} ({job['kind']} on {job['host']}) {job['phase']}: {err.get('message', job['phase'])}"
    if job["phase"] == "cancelled":
        return E.CancelledByUser(message)
    return error_of(str(err.get("kind", "job_failed")), message)


class ServiceClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._session = aiohttp.ClientSession(headers=headers)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise E.UsageError("ServiceClient is not open (use `async with`)")
        return self._session

    async def _call(self, method: str, path: str, body: JSON | None = None,
                    params: dict[str, str] | None = None) -> Any:
        try:
            async with self.session.request(method, self.url + path, json=body, params=params or None,
                                            timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                doc = await resp.json(content_type=None)
                if resp.status >= 400:
                    err = (doc or {}).get("error") or {}
                    raise error_of(str(err.get("kind", "error")), str(err.get("message", f"HTTP {resp.status}")))
                return doc
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise E.UnreachableError(f"cannot reach the volmove service at {self.url}: {exc or 'timed out'}") from None
        except (aiohttp.ClientError, ValueError) as exc:
            raise E.UnreachableError(f"the volmove service at {self.url} answered badly: {exc}") from None

    async def hosts(self) -> list[JSON]:
        return list((await self._call("GET", "/v1/hosts"))["hosts"])

    async def host(self, name: str) -> JSON:
        return dict(await self._call("GET", f"/v1/hosts/{name}"))

    async def jobs(self, *, everything: bool = False, children: bool = False) -> list[JSON]:
        params = {k: "1" for k, v in (("all", everything), ("children", children)) if v}
        return list((await self._call("GET", "/v1/jobs", params=params))["jobs"])

    async def job(self, job_id: str) -> JSON:
        return dict(await self._call("GET", f"/v1/jobs/{job_id}"))

    async def submit(self, kind: str, host: str, params: JSON, *, deadline_s: float | None = None,
                     max_attempts: int | None = None) -> JSON:
        body = {"kind": kind, "host": host, "params": params, "deadline_s": deadline_s,
                "max_attempts": max_attempts}
        return dict(await self._call("POST", "/v1/jobs", {k: v for k, v in body.items() if v is not None}))

    async def cancel(self, job_id: str) -> JSON:
        return dict(await self._call("POST", f"/v1/jobs/{job_id}/cancel"))

    async def migrate(self, volume: str, to: str, source: str | None = None, *, force: bool = False,
                      remove_source: bool = False) -> JSON:
        body = {"volume": volume, "to": to, "from": source, "force": force, "remove_source": remove_source}
        return dict(await self._call("POST", "/v1/migrations", body))

    async def schedules(self) -> list[JSON]:
        return list((await self._call("GET", "/v1/schedules"))["schedules"])

    async def add_schedule(self, doc: JSON) -> JSON:
        return dict(await self._call("POST", "/v1/schedules", doc))

    async def remove_schedule(self, name: str) -> JSON:
        return dict(await self._call("DELETE", f"/v1/schedules/{name}"))

    async def run_schedule(self, name: str) -> list[JSON]:
        """Start a schedule's jobs now; per target the job id, or why it was not started."""
        return list((await self._call("POST", f"/v1/schedules/{name}/run"))["targets"])

    async def watch(self, job_id: str | None = None) -> AsyncIterator[JSON]:
        """Job documents as they change (only ``job_id`` and its children when given)."""
        params = {"job": job_id} if job_id else None
        try:
            async with self.session.get(self.url + "/v1/watch", params=params,
                                        timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout)) as resp:
                if resp.status >= 400:
                    err = (await resp.json(content_type=None)).get("error") or {}
                    raise error_of(str(err.get("kind", "error")), str(err.get("message", f"HTTP {resp.status}")))
                async for line in resp.content:
                    if line.strip():
                        yield json.loads(line)
        except aiohttp.ClientError as exc:
            raise E.UnreachableError(f"lost the volmove service at {self.url}: {exc}") from None

    async def wait(self, job_id: str, on_update: Callable[[JSON], None] | None = None,
                   retry: float = 1.0) -> JSON:
        """Follow a job to its end; a broken stream (a service restart) is resumed."""
        while True:
            try:
                async for doc in self.watch(job_id):
                    if on_update is not None:
                        on_update(doc)
                    if doc["id"] == job_id and doc["phase"] in TERMINAL:
                        return await self.job(job_id)
            except E.UnreachableError:
                await asyncio.sleep(retry)
            job = await self._poll(job_id, retry)
            if job["phase"] in TERMINAL:
                return job

    async def _poll(self, job_id: str, retry: float) -> JSON:
        while True:
            try:
                return await self.job(job_id)
            except E.UnreachableError:
                await asyncio.sleep(retry)


def service_url(option: str | None) -> str | None:
    return option or os.environ.get(SERVICE_ENV) or None
