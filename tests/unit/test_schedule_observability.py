"""Metrics, webhook events and the schedules file: recording a job's ending,
the Prometheus text format, delivery with retries (a real HTTP server on
127.0.0.1, the retry clock in the test's hands)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from volmove.core.errors import UsageError
from volmove.core.fleet.jobs import Job, Phase
from volmove.service import metrics as M
from volmove.service.automation import load_schedules_file
from volmove.service.notify import MAX_ATTEMPTS, Notifier, job_event, retry_delay
from volmove.service.schedules_store import Outcome, ScheduleStore, VolumeObs


def job(kind: str = "backup", phase: Phase = Phase.SUCCEEDED, **over: object) -> Job:
    base: dict[str, object] = {
        "id": "j0000000001", "kind": kind, "host": "h1", "params": {"volume": "pg"}, "created": 100.0,
        "deadline": 1e9, "phase": phase, "updated": 160.0, "started_at": 110.0, "finished_at": 160.0,
        "result": {"snapshot": "s2", "stats": {"bytes": 400, "new_bytes": 40, "duration": 45.0}}}
    return Job(**{**base, **over})  # type: ignore[arg-type]


# ------------------------------------------------------------------ recording


def test_a_successful_backup_records_time_duration_and_sizes() -> None:
    outcome, dropped = M.outcome_of(job(), None, M.Alerting())
    assert not dropped
    assert outcome.volume == VolumeObs("backup", "h1", "pg", last_success=160.0, duration=50.0, new_bytes=40,
                                       bytes=400, snapshot="s2", job="j0000000001")
    assert outcome.counters == [("volmove_jobs_finished_total", {"kind": "backup", "outcome": "succeeded"}, 1)]


def test_a_backup_much_smaller_than_the_previous_one_is_flagged() -> None:
    previous = VolumeObs("backup", "h1", "pg", last_success=50.0, bytes=1000, snapshot="s1")
    outcome, dropped = M.outcome_of(job(), previous, M.Alerting(size_drop=0.5))
    assert dropped and ("volmove_backup_size_drop_alerts_total", {"host": "h1", "volume": "pg"}, 1) in outcome.counters
    assert not M.outcome_of(job(), previous, M.Alerting(size_drop=0.5, size_drop_min=4096))[1]


def test_a_failure_keeps_the_last_success_and_counts() -> None:
    previous = VolumeObs("backup", "h1", "pg", last_success=50.0, bytes=1000, snapshot="s1")
    outcome, dropped = M.outcome_of(job(phase=Phase.FAILED, result={}), previous, M.Alerting())
    assert not dropped and outcome.volume is not None
    assert (outcome.volume.last_success, outcome.volume.last_failure, outcome.volume.bytes) == (50.0, 160.0, 1000)
    assert ("volmove_jobs_failed_total", {"kind": "backup", "host": "h1"}, 1) in outcome.counters


def test_a_drill_is_recorded_for_the_host_its_snapshots_came_from() -> None:
    drill = job("drill", host="h3", params={"volume": "pg", "from_host": "h1"},
                result={"ok": True, "snapshot": "s2", "bytes": 400})
    outcome, _ = M.outcome_of(drill, None, M.Alerting())
    assert outcome.volume is not None and (outcome.volume.kind, outcome.volume.host) == ("drill", "h1")
    assert M.outcome_of(job("restore"), None, M.Alerting())[0].volume is None
    assert M.outcome_of(job(phase=Phase.CANCELLED), None, M.Alerting())[0].volume is None


def test_each_ending_is_recorded_once(tmp_path: Path) -> None:
    store = ScheduleStore(tmp_path / "s.db")
    outcome, _ = M.outcome_of(job(), None, M.Alerting())
    assert store.record(outcome) and not store.record(outcome)
    assert store.counters() == [("volmove_jobs_finished_total", {"kind": "backup", "outcome": "succeeded"}, 1.0)]
    assert store.volumes() == [outcome.volume]
    store.close()


# ------------------------------------------------------------------ exposition


def test_the_text_format_escapes_labels_and_writes_plain_numbers() -> None:
    fam = M.Family("volmove_x", "gauge", "Help.")
    fam.add({"volume": 'we"ird\\na\nme'}, 3.0)
    fam.add({}, 0.25)
    fam.add({"host": "h"}, None)  # no value: no sample
    assert M.exposition([fam]) == ('# HELP volmove_x Help.\n# TYPE volmove_x gauge\n'
                                   'volmove_x{volume="we\\"ird\\\\na\\nme"} 3\nvolmove_x 0.25\n')


def test_every_volume_gauge_has_help_and_type_even_when_empty() -> None:
    text = M.exposition(M.volume_families([]))
    for _kind, name, _attr, _help in M.VOLUME_GAUGES:
        assert f"# TYPE {name} gauge" in text


# ----------------------------------------------------------------- webhook


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def hook() -> AsyncIterator[tuple[str, list[dict[str, object]], list[int]]]:
    """A webhook that answers with the next status of ``statuses`` (then 204) and keeps every body."""
    bodies: list[dict[str, object]] = []
    statuses: list[int] = []

    async def post(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        return web.Response(status=statuses.pop(0) if statuses else 204)

    app = web.Application()
    app.add_routes([web.post("/secret-token", post)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/secret-token", bodies, statuses
    await runner.cleanup()


async def test_a_failed_delivery_is_retried_with_backoff_then_delivered(
        tmp_path: Path, hook: tuple[str, list[dict[str, object]], list[int]]) -> None:
    url, bodies, statuses = hook
    store, clock = ScheduleStore(tmp_path / "s.db"), Clock()
    notifier = Notifier(store, url, clock=clock)
    failed = job(phase=Phase.FAILED, result={}, error={"kind": "storage", "message": "disk full"})
    outcome = Outcome(failed.id, 160.0)
    notifier.add(outcome, notifier.events_for(failed, "nightly"))
    store.record(outcome)
    statuses += [500, 502]
    async with aiohttp.ClientSession() as session:
        await notifier._deliver_due(session)  # 500
        assert store.next_notification_time() == clock.now + retry_delay(1)
        await notifier._deliver_due(session)  # not due yet: nothing sent
        assert len(bodies) == 1
        clock.now += retry_delay(1)
        await notifier._deliver_due(session)  # 502
        clock.now += retry_delay(2)
        await notifier._deliver_due(session)  # delivered
    assert len(bodies) == 3 and store.pending_notifications() == 0 and notifier.delivered == 1
    assert bodies[0]["event"] == "job.failed" and bodies[0]["schedule"] == "nightly"
    assert bodies[0]["summary"] == "backup of pg on h1 failed: disk full"
    store.close()


async def test_an_undeliverable_notification_is_given_up_and_counted(
        tmp_path: Path, hook: tuple[str, list[dict[str, object]], list[int]]) -> None:
    url, bodies, statuses = hook
    store, clock = ScheduleStore(tmp_path / "s.db"), Clock()
    notifier = Notifier(store, url, clock=clock)
    outcome = Outcome("j0000000002", 1.0, notifications=[job_event(job(phase=Phase.FAILED), None)])
    store.record(outcome)
    statuses += [500] * MAX_ATTEMPTS
    async with aiohttp.ClientSession() as session:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            await notifier._deliver_due(session)
            clock.now += retry_delay(attempt)
    assert len(bodies) == MAX_ATTEMPTS and store.pending_notifications() == 0
    assert store.counters() == [("volmove_notifications_failed_total", {}, 1.0)]
    store.close()


def test_success_is_notified_only_when_asked(tmp_path: Path) -> None:
    store = ScheduleStore(tmp_path / "s.db")
    assert Notifier(store, "http://x/", on_success=False).events_for(job(), None) == []
    assert [e["event"] for e in Notifier(store, "http://x/", on_success=True).events_for(job(), None)] == \
        ["job.succeeded"]
    assert Notifier(store, None).events_for(job(phase=Phase.FAILED), None) == []  # no webhook: nothing queued
    store.close()


# ------------------------------------------------------------ schedules file


def test_the_schedules_file_is_toml_with_schedule_tables(tmp_path: Path) -> None:
    path = tmp_path / "schedules.toml"
    path.write_text('[[schedule]]\nname = "nightly"\ncron = "0 3 * * *"\njitter = "10m"\n'
                    'selector = { tier = "gold" }\nkeep = { daily = 7 }\n\n'
                    '[[schedule]]\nname = "drill"\nkind = "drill"\ncron = "@weekly"\non = "h3"\nvolumes = ["pg"]\n')
    nightly, drill = load_schedules_file(path)
    assert (nightly.jitter, nightly.source, drill.on) == (600, "file", "h3")


@pytest.mark.parametrize(("text", "error"), [
    ('[[schedule]]\nname = "a"\ncron = "@daily"\n[[schedule]]\nname = "a"\ncron = "@hourly"\n', "used twice"),
    ('[[schedule]]\nname = "a"\ncron = "@sometimes"\n', "unknown macro"),
    ('[other]\nx = 1\n', "expected only"),
    ('[[schedule]\n', "cannot read"),
])
def test_a_bad_schedules_file_is_a_usage_error(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "schedules.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=error):
        load_schedules_file(path)
