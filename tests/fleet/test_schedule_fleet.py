"""Schedules on real services: Mosquitto, three Docker engines with a worker
process each, a shared repository, and the service in this process with its
scheduler's clock in the test's hands (no test waits for a scheduled time)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiodocker
import pytest

from tests.fixtures.mqtt import Broker
from tests.fleet.conftest import MakeFleet
from tests.fleet.harness import TEST_LABELS, Fleet, make_volume, run_once, volume_exists, wait_for
from tests.fleet.schedule_harness import (
    ID,
    FakeClock,
    LiveService,
    sample,
    start_service,
    uname,
    webhook_receiver,
)
from volmove.core.fleet import schedule as S
from volmove.core.fleet.jobs import Job, Phase
from volmove.core.repository import Repository
from volmove.core.storage import open_storage
from volmove.core.verify import verified_ids

pytestmark = [pytest.mark.docker, pytest.mark.mqtt, pytest.mark.slow, pytest.mark.timeout(300)]
FILES = {"a.txt": b"alpha", "b.txt": b"bravo bravo"}
T0 = "2026-11-20T02:00:00"


@pytest.fixture
async def fleet2(make_fleet: MakeFleet, mqtt_broker: Broker) -> AsyncIterator[Fleet]:
    """Broker and workers on h1, h2, h3; the test starts the service itself."""
    f = make_fleet(mqtt_broker)
    for host in ("h1", "h2", "h3"):
        f.start_worker(host)
    yield f


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime.fromisoformat(T0).replace(tzinfo=UTC))


@pytest.fixture
async def live(fleet2: Fleet, clock: FakeClock) -> AsyncIterator[LiveService]:
    svc = await start_service(fleet2, clock, ("h1", "h2", "h3"))
    yield svc
    await svc.stop()


def snapshots(repo_url: str, volume: str) -> list[tuple[str, str, tuple[str, ...]]]:
    repo = Repository.open(open_storage(repo_url))
    return [(s.id, s.host, s.tags) for s in repo.list_snapshots(volume)]


async def all_done(live: LiveService, jobs: list[Job]) -> list[Job]:
    return [await live.done(j.id) for j in jobs]


async def test_a_schedule_fires_on_two_hosts(fleet2: Fleet, live: LiveService, clock: FakeClock) -> None:
    gold = uname("gold")
    for host in ("h1", "h2", "h3"):
        labels = {"tier": gold} if host != "h3" else {"tier": "bronze"}
        await make_volume(fleet2.engines[host], uname(f"web-{host}"), FILES, labels=labels)
        await live.inventory_has(host, uname(f"web-{host}"))
    await live.service.automation.scheduler.add(
        {"name": "gold", "cron": "0 3 * * *", "jitter": "10m", "selector": {"tier": gold}})

    steps = [s for s in await live.tick() if s.target.schedule == "gold"]
    assert sorted((s.action, s.target.host) for s in steps) == [("start", "h1"), ("start", "h2")]
    clock.set("2026-11-20T02:59:00")  # 02:00 was the first sight; the next run is 03:00 plus each host's jitter
    assert [s for s in await live.tick() if s.target.schedule == "gold"] == []
    clock.set("2026-11-20T03:10:01")  # past 03:00 and any jitter
    fired = [s for s in await live.tick() if s.action == "fire" and s.target.schedule == "gold"]

    assert sorted(s.target.host for s in fired) == ["h1", "h2"]
    jobs = await all_done(live, [j for j in live.jobs("backup") if "schedule=gold" in j.params["tags"]])
    assert sorted((j.host, j.phase) for j in jobs) == [("h1", Phase.SUCCEEDED), ("h2", Phase.SUCCEEDED)]
    for host in ("h1", "h2"):
        (snap,) = snapshots(fleet2.repo, uname(f"web-{host}"))
        assert snap[1] == host and "schedule=gold" in snap[2]
    assert snapshots(fleet2.repo, uname("web-h3")) == []
    assert [s for s in await live.tick() if s.action == "fire" and s.target.schedule == "gold"] == []  # once


async def test_a_missed_run_runs_once_after_a_service_restart(fleet2: Fleet, clock: FakeClock) -> None:
    vol = uname("hourly")
    await make_volume(fleet2.engines["h1"], vol, FILES, labels={"volmove.schedule": "@hourly"})
    live = await start_service(fleet2, clock, ("h1",))
    await live.inventory_has("h1", vol)
    assert [s.action for s in await live.tick() if s.target.volume == vol] == ["start"]
    await live.stop()

    clock.set("2026-11-20T07:30:00")  # 03:00 .. 07:00 passed while the service was down
    live = await start_service(fleet2, clock, ("h1",))
    try:
        await live.tick()
        await live.tick()
        jobs = live.jobs("backup", vol)
        assert len(jobs) == 1, jobs
        assert (await live.done(jobs[0].id)).phase is Phase.SUCCEEDED
        await live.tick()
        assert len(live.jobs("backup", vol)) == 1
        assert len(snapshots(fleet2.repo, vol)) == 1
        clock.set("2026-11-20T08:00:05")  # the next hour runs as usual
        await live.tick()
        assert len(live.jobs("backup", vol)) == 2
        await all_done(live, live.jobs("backup", vol))
    finally:
        await live.stop()


async def test_no_two_backups_of_one_volume_at_once(make_fleet: MakeFleet, mqtt_broker: Broker,
                                                    clock: FakeClock) -> None:
    f = make_fleet(mqtt_broker)
    f.start_worker("h1", VOLMOVE_WORKER_FAULTS="backup=delay:3")  # each backup takes a while
    vol = uname("busy")
    await make_volume(f.engines["h1"], vol, FILES, labels={"volmove.schedule": uname("b")})
    live = await start_service(f, clock, ("h1",))
    try:
        await live.service.automation.scheduler.add({"name": uname("a"), "cron": "* * * * *", "volumes": [vol]})
        await live.service.automation.scheduler.add({"name": uname("b"), "cron": "*/2 * * * *"})
        await live.inventory_has("h1", vol)
        await live.tick()
        for minute in range(1, 7):  # six passes a minute apart, while backups take seconds each
            clock.advance(minutes=1)
            steps = await live.tick()
            active = [j for j in live.jobs("backup", vol) if not j.terminal]
            assert len(active) <= 1, active
            assert all(s.reason.startswith("a backup of") for s in steps if s.action == "wait")
            if minute % 2 == 0:
                await all_done(live, active)  # let it finish now and then
        finals = await all_done(live, live.jobs("backup", vol))
        spans = sorted((j.started_at or 0, j.finished_at or 0) for j in finals)
        assert all(a_end <= b_start for (_s, a_end), (b_start, _e) in itertools.pairwise(spans))
        tags = {t for j in finals for t in j.params["tags"]}
        assert {f"schedule={uname('a')}", f"schedule={uname('b')}"} <= tags  # both schedules ran, in turn
    finally:
        await live.stop()


async def test_a_newly_labelled_volume_is_picked_up_from_the_inventory(fleet2: Fleet, live: LiveService,
                                                                       clock: FakeClock) -> None:
    name = uname("nightly")
    await live.service.automation.scheduler.add({"name": name, "cron": "0 4 * * *"})
    await live.tick()
    (doc,) = [d for d in live.service.automation.scheduler.describe() if d["name"] == name]
    assert doc["targets"] == []

    on_volume = uname("labelled")
    await make_volume(fleet2.engines["h3"], on_volume, FILES, labels={"volmove.schedule": name})
    by_container = uname("used")
    await make_volume(fleet2.engines["h2"], by_container, FILES)
    user = await _container(fleet2.engines["h2"], by_container, {"volmove.schedule": name})
    await live.inventory_has("h3", on_volume)
    # Only the user: make_volume's short-lived writer can show in an earlier inventory.
    entry = await live.inventory_has("h2", by_container, where=lambda v: v.containers == (user,))
    assert entry.container_schedules == (name,)

    steps = [s for s in await live.tick() if s.target.schedule == name]
    assert sorted((s.action, s.target.host, s.target.volume) for s in steps) == [
        ("start", "h2", by_container), ("start", "h3", on_volume)]
    clock.set("2026-11-20T04:00:30")
    fired = [s for s in await live.tick() if s.action == "fire" and s.target.schedule == name]
    assert sorted((s.target.host, s.target.volume) for s in fired) == [("h2", by_container), ("h3", on_volume)]
    jobs = [j for v in (by_container, on_volume) for j in live.jobs("backup", v)]
    assert [j.phase for j in await all_done(live, jobs)] == [Phase.SUCCEEDED] * 2


async def _container(url: str, volume: str, labels: dict[str, str]) -> str:
    """A stopped container using the volume; returns its name."""
    async with aiodocker.Docker(url=url) as api:
        name = f"user-{volume}"
        await api.containers.create(name=name, config={
            "Image": "volmove-helper:1", "Cmd": ["busybox", "true"], "Labels": {**TEST_LABELS, **labels},
            "HostConfig": {"Mounts": [{"Type": "volume", "Source": volume, "Target": "/data"}],
                           "NetworkMode": "none"}})
        return name


async def test_the_metrics_endpoint_shows_the_last_backup(fleet2: Fleet, live: LiveService) -> None:
    vol = uname("metered")
    await make_volume(fleet2.engines["h2"], vol, {"f.bin": b"m" * 5000})
    await live.inventory_has("h2", vol)
    await live.service.automation.scheduler.add({"name": "m", "cron": "@daily", "volumes": [vol]})
    await live.tick()
    (started,) = await live.service.automation.scheduler.run_now("m")
    job = await live.done(started["job"])
    assert job.phase is Phase.SUCCEEDED
    labels = {"host": "h2", "volume": vol}

    text = await live.metrics("volmove_backup_last_success_timestamp_seconds", **labels)  # a real HTTP GET

    assert sample(text, "volmove_backup_last_success_timestamp_seconds", **labels) == pytest.approx(job.finished_at)
    assert sample(text, "volmove_backup_last_bytes", **labels) == 5000
    assert sample(text, "volmove_backup_last_new_bytes", **labels) == job.result["stats"]["new_bytes"] > 0
    assert 0 < (sample(text, "volmove_backup_last_duration_seconds", **labels) or 0) < 60
    assert sample(text, "volmove_jobs_finished_total", kind="backup", outcome="succeeded") == 1
    assert [sample(text, "volmove_host_up", host=h) for h in ("h1", "h2", "h3")] == [1, 1, 1]
    assert sample(text, "volmove_hosts_up") == 3
    assert sample(text, "volmove_schedule_next_run_timestamp_seconds", schedule="m", host="h2", volume=vol) == \
        datetime(2026, 11, 21, tzinfo=UTC).timestamp()
    status, health = await live.get("/healthz")
    assert status == 200 and '"ok": true' in health


async def test_a_failed_job_posts_a_json_webhook(make_fleet: MakeFleet, mqtt_broker: Broker,
                                                 clock: FakeClock) -> None:
    f = make_fleet(mqtt_broker)
    f.start_worker("h2", VOLMOVE_WORKER_FAULTS="backup=fail")
    vol = uname("doomed")
    await make_volume(f.engines["h2"], vol, FILES)
    async with webhook_receiver() as hook:
        live = await start_service(f, clock, ("h2",), webhook=hook.url)
        try:
            await live.service.automation.scheduler.add({"name": "doomed", "cron": "@daily", "volumes": [vol]})
            await live.inventory_has("h2", vol)
            await live.tick()
            (started,) = await live.service.automation.scheduler.run_now("doomed")
            assert (await live.done(started["job"])).phase is Phase.FAILED
            body = await hook.event("job.failed", volume=vol)
            text = await live.metrics("volmove_jobs_failed_total", kind="backup", host="h2")
        finally:
            await live.stop()
    assert body["host"] == "h2" and body["schedule"] == "doomed" and body["job"]["id"] == started["job"]
    assert body["job"]["kind"] == "backup" and "injected fault" in body["job"]["error"]["message"]
    assert body["summary"].startswith(f"backup of {vol} on h2 failed: injected fault")
    assert sample(text, "volmove_jobs_failed_total", kind="backup", host="h2") == 1
    assert sample(text, "volmove_backup_last_failure_timestamp_seconds", host="h2", volume=vol) is not None
    assert [b["event"] for b in hook.bodies] == ["job.failed"]  # no success notices unless asked


async def test_a_backup_much_smaller_than_the_previous_one_alerts(fleet2: Fleet, clock: FakeClock) -> None:
    vol = uname("shrinking")
    await make_volume(fleet2.engines["h1"], vol, {"keep.txt": b"k" * 1000})
    await run_once(fleet2.engines["h1"], vol, "dd if=/dev/zero of=/data/big bs=1k count=200 2>/dev/null")
    async with webhook_receiver() as hook:
        live = await start_service(fleet2, clock, ("h1",), webhook=hook.url)
        try:
            scheduler = live.service.automation.scheduler
            await scheduler.add({"name": "s", "cron": "@daily", "volumes": [vol]})
            await live.inventory_has("h1", vol)
            await live.tick()
            first = await live.done((await scheduler.run_now("s"))[0]["job"])
            await run_once(fleet2.engines["h1"], vol, "rm /data/big")  # an app lost most of its data
            second = await live.done((await scheduler.run_now("s"))[0]["job"])
            alert = await hook.event("backup.size_drop", volume=vol)
            text = await live.metrics("volmove_backup_size_drop_alerts_total", host="h1", volume=vol)
        finally:
            await live.stop()
    assert first.phase is second.phase is Phase.SUCCEEDED
    assert alert["bytes"] == 1000 and alert["previous_bytes"] == 1000 + 200 * 1024
    assert alert["snapshot"] == second.result["snapshot"] and alert["previous_snapshot"] == first.result["snapshot"]
    assert alert["host"] == "h1" and alert["schedule"] == "s" and alert["ratio"] < 0.01
    assert sample(text, "volmove_backup_size_drop_alerts_total", host="h1", volume=vol) == 1


async def test_a_restore_drill_restores_compares_reports_and_removes_its_scratch_volume(
        fleet2: Fleet, live: LiveService) -> None:
    vol = uname("drilled")
    await make_volume(fleet2.engines["h1"], vol, FILES, labels={"app": "db", "volmove.schedule": uname("nightly")})
    await run_once(fleet2.engines["h1"], vol, "mkdir /data/sub && ln -s ../a.txt /data/sub/link && chmod 640 /data/a*")
    await live.inventory_has("h1", vol)
    scheduler = live.service.automation.scheduler
    await scheduler.add({"name": uname("nightly"), "cron": "@daily"})
    await scheduler.add({"name": "drill", "kind": "drill", "cron": "0 5 * * 0", "on": "h3", "volumes": [vol]})
    await live.tick()
    backup = await live.done((await scheduler.run_now(uname("nightly")))[0]["job"])

    (started,) = await scheduler.run_now("drill")

    drill = await live.done(started["job"])
    assert (drill.kind, drill.host, drill.phase) == ("drill", "h3", Phase.SUCCEEDED)
    report = drill.result
    assert report["ok"] and report["snapshot"] == backup.result["snapshot"] and report["from_host"] == "h1"
    assert report["checked"] == 5 and report["files"] == 2 and report["removed"]
    assert not await volume_exists(fleet2.engines["h3"], report["scratch"])
    assert backup.result["snapshot"] in verified_ids(Repository.open(open_storage(fleet2.repo)))
    text = await live.metrics("volmove_drill_last_success_timestamp_seconds", host="h1", volume=vol)
    status, drills = await live.get("/v1/drills")
    assert status == 200 and report["scratch"] in drills and '"volume": "' + vol in drills
    assert sample(text, "volmove_drill_last_success_timestamp_seconds", host="h1", volume=vol) == \
        pytest.approx(drill.finished_at)


async def test_a_failed_drill_notifies_and_leaves_no_scratch_volume(
        make_fleet: MakeFleet, mqtt_broker: Broker, clock: FakeClock) -> None:
    f = make_fleet(mqtt_broker)
    f.start_worker("h1")
    f.start_worker("h3")
    vol = uname("nosnap")
    await make_volume(f.engines["h1"], vol, FILES)
    async with webhook_receiver() as hook:
        live = await start_service(f, clock, ("h1", "h3"), webhook=hook.url)
        try:
            scheduler = live.service.automation.scheduler
            await scheduler.add({"name": "drill", "kind": "drill", "cron": "@weekly", "on": "h3", "volumes": [vol]})
            await live.tick()
            drill = await live.done((await scheduler.run_now("drill"))[0]["job"])  # nothing backed up yet
            body = await hook.event("job.failed", volume=vol)
        finally:
            await live.stop()
    assert drill.phase is Phase.FAILED and drill.error is not None and drill.error["kind"] == "not_found"
    assert f"no snapshot of volume {vol} from host h1" in body["summary"]
    assert not await volume_exists(f.engines["h3"], f"volmove-drill-{drill.id}")


async def test_retention_runs_after_each_scheduled_backup(fleet2: Fleet, live: LiveService) -> None:
    vol = uname("kept")
    await make_volume(fleet2.engines["h2"], vol, FILES)
    await live.inventory_has("h2", vol)
    scheduler = live.service.automation.scheduler
    await scheduler.add({"name": "k", "cron": "@hourly", "volumes": [vol], "keep": {"last": 2}})
    await live.tick()
    for i in range(3):
        await run_once(fleet2.engines["h2"], vol, f"echo {i} > /data/n")
        await live.done((await scheduler.run_now("k"))[0]["job"])
        forget = await _next_job(live, "forget", i + 1)
        assert forget.phase is Phase.SUCCEEDED, forget.error
    kept = [s[0] for s in snapshots(fleet2.repo, vol)]
    assert len(kept) == 2 and forget.result["removed"] and set(forget.result["kept"]) == set(kept)


async def _next_job(live: LiveService, kind: str, count: int) -> Job:
    async def there() -> Job | None:
        jobs = live.jobs(kind)
        return jobs[-1] if len(jobs) >= count else None
    return await live.done((await wait_for(there, 30, f"{count} {kind} jobs")).id)


async def test_a_scratch_volume_left_by_an_ended_drill_is_removed(fleet2: Fleet, live: LiveService) -> None:
    scheduler = live.service.automation.scheduler
    await scheduler.add({"name": "drill", "kind": "drill", "cron": "@weekly", "on": "h3", "volumes": ["nothing"]})
    drill = await live.done(await scheduler.submit(S.Submission("drill", "h3", {"volume": "nothing"})) or "")
    assert drill.phase is Phase.FAILED  # no snapshot: over at once
    scratch = f"volmove-drill-{drill.id}-{ID}"  # as a worker killed mid-drill would leave it
    await make_volume(fleet2.engines["h3"], scratch, labels={"volmove.drill": drill.id})
    await live.inventory_has("h3", scratch)
    await live.tick()
    (removal,) = live.jobs("remove-volume", scratch)
    assert (await live.done(removal.id)).phase is Phase.SUCCEEDED
    assert not await volume_exists(fleet2.engines["h3"], scratch)


async def test_a_job_stored_but_not_submitted_before_a_crash_runs_once_at_start_up(
        fleet2: Fleet, clock: FakeClock) -> None:
    from volmove.service.schedules_store import Fired, ScheduleStore

    vol = uname("crashed")
    await make_volume(fleet2.engines["h1"], vol, FILES)
    fleet2.dir.joinpath("service.db").touch()
    store = ScheduleStore(fleet2.dir / "service.db")  # as the scheduler left it when the process died
    target = S.Target("gone", "h1", vol)
    fired = Fired("jcrash00001", "gone", target.key, "backup", "h1", {"volume": vol}, clock.now.timestamp())
    store.save_targets([(target, S.TargetState(clock.now, clock.now, fired.job))], [fired])
    store.close()
    live = await start_service(fleet2, clock, ("h1",))  # this database never saw h1: it is known once it reports
    try:
        await live.tick()
        job = await live.done(fired.job)
        assert job.phase is Phase.SUCCEEDED and job.params["volume"] == vol
        assert live.service.automation.scheduler.store.unsubmitted() == []
    finally:
        await live.stop()
    live = await start_service(fleet2, clock, ("h1",))  # a second start submits nothing again
    try:
        await live.tick()
        assert [j.id for j in live.jobs("backup", vol)] == ["jcrash00001"]
        assert len(snapshots(fleet2.repo, vol)) == 1
    finally:
        await live.stop()
