"""Schedules as pure functions: definitions, selection, due times, no overlap,
missed runs, jitter, retention and size-drop rules — all with time passed in."""

from __future__ import annotations

import ast
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from volmove.core.fleet import schedule as S
from volmove.core.fleet.protocol import Inventory, VolumeEntry
from volmove.core.policy.retention import parse_duration

T0 = datetime(2026, 11, 20, 10, 0, 30, tzinfo=UTC)  # a Friday, half a minute past 10:00


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def sched(**over: object) -> S.ScheduleDef:
    return S.ScheduleDef.parse({"name": "nightly", "cron": "0 * * * *", **over})


def vol(name: str, labels: dict[str, str] | None = None, containers: tuple[str, ...] = (),
        container_schedules: tuple[str, ...] = ()) -> VolumeEntry:
    return VolumeEntry(name, "local", 0, labels or {}, containers, (), container_schedules)


def inv(host: str, *volumes: VolumeEntry) -> Inventory:
    return Inventory(host, 0.0, volumes)


# ------------------------------------------------------------------ definitions


def test_a_definition_round_trips_and_keeps_its_rules() -> None:
    doc = {"name": "gold", "cron": "30  2 * * *", "jitter": "1h30m", "selector": {"tier": "gold"},
           "hosts": ["h1"], "keep": {"daily": 7, "weekly": 4, "within": "2d"}, "tags": ["nightly"], "stop": True}
    s = S.ScheduleDef.parse(doc)
    assert (s.cron, s.jitter, s.selector, s.hosts) == ("30 2 * * *", 5400, (("tier", "gold"),), ("h1",))
    assert S.ScheduleDef.parse(s.as_dict()) == s
    assert s.keep is not None
    policy = s.keep.policy()
    assert (policy.keep_daily, policy.keep_weekly, policy.keep_last) == (7, 4, None)
    assert policy.keep_within == parse_duration("2d")


@pytest.mark.parametrize(("over", "error"), [
    ({"name": "Bad Name"}, "invalid schedule name"),
    ({"cron": "61 * * * *"}, "minute 61 is out of range"),
    ({"cron": ""}, "cron is required"),
    ({"kind": "drill"}, "a drill needs 'on'"),
    ({"on": "h2"}, "'on' belongs to drills"),
    ({"kind": "drill", "on": "h2", "keep": {"daily": 1}}, "keep and stop belong to backup"),
    ({"keep": {}}, "keep needs at least one rule"),
    ({"keep": {"daily": -1}}, "keep daily must be a count"),
    ({"keep": {"fortnightly": 2}}, "unknown keep rule"),
    ({"keep": {"within": "soon"}}, "bad duration"),
    ({"jitter": "-5"}, "jitter must be"),
    ({"jitter": 8 * 24 * 3600}, "jitter must be between"),
    ({"selector": {"tier": 1}}, "selector must map"),
    ({"volumes": ["../etc"]}, "invalid volume"),
    ({"hosts": ["h/1"]}, "invalid host name"),
    ({"colour": "red"}, "unknown schedule field"),
])
def test_invalid_definitions_are_refused_with_the_reason(over: dict[str, object], error: str) -> None:
    with pytest.raises(S.ScheduleError, match=error):
        sched(**over)


@pytest.mark.parametrize(("value", "seconds"), [(0, 0), ("90", 90), ("90s", 90), ("10m", 600), ("1h30m", 5400),
                                                ("1d", 86400)])
def test_jitter_takes_seconds_or_durations(value: object, seconds: int) -> None:
    assert S.parse_seconds(value) == seconds


# -------------------------------------------------------------------- selection


def test_volumes_are_selected_by_name_selector_and_labels_on_volumes_or_containers() -> None:
    schedules = [sched(name="byname", volumes=["pg"]), sched(name="gold", selector={"tier": "gold"}),
                 sched(name="any", selector={"backup": "*"}), sched(name="nightly")]
    inventories = {
        "h1": inv("h1", vol("pg"), vol("web", {"tier": "gold"}), vol("cache", {"tier": "bronze"})),
        "h2": inv("h2", vol("pg", {"backup": "yes"}), vol("logs", {S.SCHEDULE_LABEL: "nightly"}),
                  vol("db", containers=("app",), container_schedules=("nightly",))),
    }
    _, targets = S.select(schedules, inventories)
    assert [(t.schedule, t.host, t.volume) for t in targets] == [
        ("any", "h2", "pg"), ("byname", "h1", "pg"), ("byname", "h2", "pg"), ("gold", "h1", "web"),
        ("nightly", "h2", "db"), ("nightly", "h2", "logs")]


def test_a_cron_in_a_label_is_a_schedule_of_its_own() -> None:
    inventories = {"h1": inv("h1", vol("a", {S.SCHEDULE_LABEL: "@daily"}),
                             vol("b", containers=("c",), container_schedules=("0  3 * * *",)))}
    schedules, targets = S.select([], inventories)
    assert [t.key for t in targets] == ["label:0 3 * * *|h1|b", "label:@daily|h1|a"]
    assert schedules["label:@daily"].source == "label" and schedules["label:0 3 * * *"].cron == "0 3 * * *"


def test_a_label_may_name_several_schedules_and_hosts_limit_a_schedule() -> None:
    schedules = [sched(name="a"), sched(name="b", hosts=["h2"])]
    inventories = {h: inv(h, vol("v", {S.SCHEDULE_LABEL: "a,b"})) for h in ("h1", "h2")}
    _, targets = S.select(schedules, inventories)
    assert [t.key for t in targets] == ["a|h1|v", "a|h2|v", "b|h2|v"]


def test_drill_scratch_volumes_are_never_selected() -> None:
    inventories = {"h1": inv("h1", vol("volmove-drill-j1", {S.DRILL_LABEL: "j1", "tier": "gold"}))}
    assert S.select([sched(selector={"tier": "gold"})], inventories)[1] == []


# ----------------------------------------------------------------------- timing


ONLINE = S.World(frozenset({"h1", "h2", "h3"}))


def run_ticks(s: S.ScheduleDef, targets: list[S.Target], times: list[datetime],
              world: S.World = ONLINE) -> tuple[list[tuple[datetime, str, int]], dict[str, S.TargetState]]:
    """Drive ``decide`` over the given times, applying its states; the fires as (time, key, missed)."""
    states: dict[str, S.TargetState] = {}
    fires = []
    for now in times:
        for step in S.decide({s.name: s}, targets, states, world, now):
            if step.action != "wait":
                states[step.target.key] = step.state
            if step.action == "fire":
                fires.append((now, step.target.key, step.missed))
    return fires, states


def test_a_new_target_waits_for_the_next_scheduled_time() -> None:
    target = S.Target("nightly", "h1", "v")
    fires, _ = run_ticks(sched(), [target], [at(0), at(30), at(59), at(59.6), at(60), at(61)])
    assert fires == [(at(59.6), target.key, 1)]  # 11:00:00 is at(59.5)


def test_every_scheduled_time_fires_once_over_a_simulated_day() -> None:
    target = S.Target("nightly", "h1", "v")
    times = [at(m) for m in range(0, 24 * 60 + 7, 7)]  # a pass every 7 minutes, for a day
    fires, _ = run_ticks(sched(), [target], times)
    assert len(fires) == 24 and all(m == 1 for *_x, m in fires)
    assert [f[0].hour for f in fires] == [*range(11, 24), *range(0, 11)]


def test_runs_missed_during_a_downtime_run_once_when_back() -> None:
    target = S.Target("nightly", "h1", "v")
    fires, _ = run_ticks(sched(), [target], [at(0), at(5 * 60), at(5 * 60 + 1), at(5 * 60 + 30)])
    assert fires == [(at(300), target.key, 5)]  # 11:00 .. 15:00 missed: one run


def test_a_busy_volume_waits_and_then_runs_once() -> None:
    s, target = sched(), S.Target("nightly", "h1", "v")
    states = {target.key: S.TargetState(at(0))}
    busy = S.World(ONLINE.online, frozenset({("backup", "h1", "v")}))
    waits = S.decide({s.name: s}, [target], states, busy, at(200))
    assert [(w.action, w.reason) for w in waits] == [("wait", "a backup of v is still running")]
    assert waits[0].state == states[target.key]  # still due
    (fire,) = S.decide({s.name: s}, [target], states, ONLINE, at(201))
    assert (fire.action, fire.missed) == ("fire", 3)  # 11:00, 12:00 and 13:00: one run
    assert S.decide({s.name: s}, [target], {target.key: fire.state}, ONLINE, at(202)) == []


def test_two_schedules_of_one_volume_never_start_together() -> None:
    a, b = sched(name="a"), sched(name="b", cron="@hourly")
    targets = [S.Target("a", "h1", "v"), S.Target("b", "h1", "v")]
    states = {t.key: S.TargetState(at(0)) for t in targets}
    steps = S.decide({"a": a, "b": b}, targets, states, ONLINE, at(61))
    assert [(s.target.schedule, s.action) for s in steps] == [("a", "fire"), ("b", "wait")]


def test_an_offline_host_waits_and_runs_once_when_back() -> None:
    s, target = sched(), S.Target("nightly", "h1", "v")
    states = {target.key: S.TargetState(at(0))}
    offline = S.World(frozenset({"h2"}))
    (wait,) = S.decide({s.name: s}, [target], states, offline, at(61))
    assert wait.reason == "host h1 is offline"
    (fire,) = S.decide({s.name: s}, [target], states, ONLINE, at(300))
    assert fire.action == "fire" and fire.missed == 5


def test_a_drill_runs_on_its_host_and_is_kept_apart_per_volume() -> None:
    drill = sched(name="drill", kind="drill", on="h3")
    target = S.Target("drill", "h1", "pg")
    assert S.job_for(drill, target) == S.Submission("drill", "h3", {"volume": "pg", "from_host": "h1"})
    states = {target.key: S.TargetState(at(0))}
    no_h3 = S.World(frozenset({"h1"}))
    assert S.decide({"drill": drill}, [target], states, no_h3, at(61))[0].reason == "host h3 is offline"
    key = S.busy_key("drill", "h3", {"volume": "pg", "from_host": "h1"})
    assert key is not None
    busy = S.World(ONLINE.online, frozenset({key}))
    assert S.decide({"drill": drill}, [target], states, busy, at(61))[0].action == "wait"
    # a backup of the same volume does not hold a drill back
    backing_up = S.World(ONLINE.online, frozenset({("backup", "h1", "pg")}))
    assert S.decide({"drill": drill}, [target], states, backing_up, at(61))[0].action == "fire"


def test_jitter_is_fixed_per_target_and_within_bounds() -> None:
    s = sched(jitter="30m")
    offsets = {h: S.offset(s, S.Target("nightly", h, "v")) for h in ("h1", "h2", "h3", "h4")}
    assert all(timedelta(0) <= o <= timedelta(minutes=30) for o in offsets.values())
    assert len(set(offsets.values())) > 1  # hosts sharing a schedule do not all start together
    assert offsets == {h: S.offset(s, S.Target("nightly", h, "v")) for h in offsets}
    target = S.Target("nightly", "h2", "v")
    fires, _ = run_ticks(s, [target], [at(m / 2) for m in range(0, 4 * 60)])  # a pass every 30 s for 2 h
    due = [datetime(2026, 11, 20, hour, tzinfo=UTC) + offsets["h2"] for hour in (10, 11, 12)]
    first_pass_after = [t + timedelta(seconds=(30 - t.second) % 30) for t in due if T0 < t <= at(119.5)]
    assert len(first_pass_after) >= 2
    assert [f[0] for f in fires] == first_pass_after


def test_a_run_by_hand_keeps_the_cron_times() -> None:
    s, target = sched(), S.Target("nightly", "h1", "v")
    state = S.fire_now(s, target, S.TargetState(at(0)), at(20))
    assert state.last_fired == at(20) and S.next_fire(s, target, state) == at(59.5)


# ------------------------------------------------------------------------- jobs


def test_busy_keys_of_active_jobs() -> None:
    assert S.busy_key("backup", "h1", {"volume": "v"}) == ("backup", "h1", "v")
    assert S.busy_key("drill", "h3", {"volume": "v", "from_host": "h1"}) == ("drill", "h1", "v")
    assert S.busy_key("restore", "h1", {"volume": "v"}) is None
    assert S.busy_key("start-containers", "h1", {"containers": []}) is None


def test_a_scheduled_backup_is_tagged_and_followed_by_its_retention() -> None:
    s = sched(tags=["t"], stop=True, keep={"last": 3, "within": "7d"})
    target = S.Target("nightly", "h2", "pg")
    assert S.job_for(s, target) == S.Submission("backup", "h2", {"volume": "pg", "tags": ["t", "schedule=nightly"],
                                                                 "stop": True})
    assert S.retention_job(s, target) == S.Submission("forget", "h2", {"volume": "pg", "host": "h2", "keep_last": 3,
                                                                       "keep_within": "7d"})
    assert S.retention_job(sched(), target) is None


@pytest.mark.parametrize(("previous", "current", "drop", "minimum", "alert"), [
    (1000, 400, 0.5, 0, True),
    (1000, 500, 0.5, 0, False),
    (1000, 0, 0.5, 0, True),
    (None, 0, 0.5, 0, False),  # the first backup
    (1000, 10, 0.0, 0, False),  # off
    (1000, 10, 0.5, 4096, False),  # too small to matter
    (0, 0, 0.5, 0, False),
    (1000, 890, 0.1, 0, True),
])
def test_size_drop_rule(previous: int | None, current: int, drop: float, minimum: int, alert: bool) -> None:
    assert S.size_dropped(previous, current, drop, minimum) is alert


def test_scratch_volumes_of_drills_known_to_have_ended_are_orphans() -> None:
    inventories = {"h3": inv("h3", vol("volmove-drill-j1", {S.DRILL_LABEL: "j1"}),
                             vol("volmove-drill-j2", {S.DRILL_LABEL: "j2"}),  # running, or another service's
                             vol("volmove-drill-j3", {S.DRILL_LABEL: "j3"}, containers=("helper",)),
                             vol("pg"))}
    assert S.orphan_scratch_volumes(inventories, {"j1", "j3"}) == [("h3", "volmove-drill-j1")]


def test_two_schedules_of_one_busy_volume_take_turns() -> None:
    a, b = sched(name="a", cron="* * * * *"), sched(name="b", cron="*/2 * * * *")
    targets = [S.Target("a", "h1", "v"), S.Target("b", "h1", "v")]
    states: dict[str, S.TargetState] = {}
    ran = []
    for minute in range(0, 12):
        busy = S.World(ONLINE.online, frozenset({("backup", "h1", "v")}) if minute % 2 else frozenset())
        for step in S.decide({"a": a, "b": b}, targets, states, busy, at(minute)):
            if step.action != "wait":
                states[step.target.key] = step.state
            if step.action == "fire":
                ran.append(step.target.schedule)
    assert ran.count("a") >= 2 and ran.count("b") >= 2, ran  # a backup every other minute; neither starves


def test_the_schedule_module_imports_no_io() -> None:
    io = {"asyncio", "aiomqtt", "paho", "sqlite3", "aiohttp", "aiodocker", "socket", "os", "time", "boto3"}
    tree = ast.parse(Path(S.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & io
