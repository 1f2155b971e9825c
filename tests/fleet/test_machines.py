"""The pure parts of the fleet, with time passed in: messages, the job table, hosts, the migrate workflow."""

from __future__ import annotations

import ast
import json
from dataclasses import replace
from pathlib import Path

import pytest

from volmove.core.errors import ConflictError, NotFoundError, UnreachableError, UsageError
from volmove.core.fleet import jobs as J
from volmove.core.fleet import migrate as M
from volmove.core.fleet import protocol as P
from volmove.core.fleet.hosts import HostState, apply_status
from volmove.core.fleet.topics import Topics

FLEET = Path(__file__).resolve().parents[2] / "core" / "volmove" / "core" / "fleet"
T0 = 1000.0


# ---------------------------------------------------------------- protocol


def run_msg(**over: object) -> dict[str, object]:
    doc: dict[str, object] = {"v": 1, "type": "job.run", "job": "j0123456789", "attempt": 1, "kind": "backup",
                              "params": {"volume": "data"}, "deadline": T0}
    doc.update(over)
    return doc


def test_a_job_message_round_trips_with_typed_params() -> None:
    msg = P.decode(json.dumps(run_msg(params={"volume": "db", "tags": ["x"], "stop": True})).encode())
    assert isinstance(msg, P.RunJob) and msg.params == P.BackupParams("db", ("x",), True)
    assert P.decode(P.encode(msg)) == msg


@pytest.mark.parametrize(("over", "error"), [
    ({"v": 2}, "unsupported message version 2"),
    ({"type": "job.explode"}, "unknown message type"),
    ({"kind": "format-disk"}, "unknown job kind"),
    ({"params": {"volume": "../etc"}}, "invalid volume"),
    ({"params": {"volume": "a/b"}}, "invalid volume"),
    ({"params": {"volume": "ok", "stop": "yes"}}, "'stop' must be bool"),
    ({"params": {"volume": "ok", "tags": ["bad\nline"]}}, "invalid tag"),
    ({"job": "../../x"}, "invalid job id"),
    ({"attempt": 0}, "invalid attempt"),
    ({"attempt": True}, "'attempt' must be int"),
    ({"deadline": "soon"}, "'deadline' must be float"),
])
def test_invalid_messages_are_refused_with_the_reason(over: dict[str, object], error: str) -> None:
    with pytest.raises(P.ProtocolError, match=error):
        P.decode(json.dumps(run_msg(**over)).encode())


def test_restore_params_check_snapshot_references() -> None:
    assert P.parse_params("restore", {"volume": "v", "snapshot": "abcd"}) == P.RestoreParams("v", "abcd")
    with pytest.raises(P.ProtocolError):
        P.parse_params("restore", {"volume": "v", "snapshot": "latest; rm -rf /"})


def test_topics_confine_each_host_to_its_own_subtree() -> None:
    t = Topics()
    assert t.status("h1") == "volmove/v1/hosts/h1/status" and t.cmd("h1") == "volmove/v1/cmd/h1"
    assert t.parse_host_topic("volmove/v1/hosts/h1/events") == ("h1", "events")
    assert t.parse_host_topic("volmove/v1/hosts/h1/other") is None
    for bad in ("h/1", "+", "#", ""):
        with pytest.raises(P.ProtocolError):
            t.status(bad)


def test_pure_fleet_modules_import_no_io() -> None:
    io = {"asyncio", "aiomqtt", "paho", "sqlite3", "aiohttp", "aiodocker", "socket", "os", "time", "boto3"}
    for name in ("protocol", "topics", "jobs", "migrate", "hosts"):
        tree = ast.parse((FLEET / f"{name}.py").read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & io, f"{name} imports {imported & io}"


# ---------------------------------------------------------------- the job table


def job(**over: object) -> J.Job:
    base = J.Job("j0123456789", "backup", "h1", {"volume": "v"}, created=T0, deadline=T0 + 100)
    return replace(base, **over)  # type: ignore[arg-type]


def kinds(effects: list[J.Effect]) -> list[str]:
    return [type(e).__name__ for e in effects]


def test_a_queued_job_is_sent_only_when_its_host_is_online() -> None:
    j, fx = J.step(job(), J.Tick(T0, online=False))
    assert j.phase is J.Phase.QUEUED and fx == []
    j, fx = J.step(j, J.Tick(T0 + 1, online=True))
    assert j.phase is J.Phase.ASSIGNED and j.sent_at == T0 + 1 and kinds(fx) == ["SendRun"]


def test_an_unconfirmed_job_is_sent_again_after_the_ack_timeout() -> None:
    j, _ = J.step(job(), J.Tick(T0, True))
    assert J.step(j, J.Tick(T0 + 4, True))[1] == []
    j, fx = J.step(j, J.Tick(T0 + 5, True))
    assert kinds(fx) == ["SendRun"] and j.sent_at == T0 + 5
    j, _ = J.step(j, J.Accepted(1, T0 + 6))
    assert J.step(j, J.Tick(T0 + 60, True))[1] == []  # confirmed: waits, never resends


def test_the_lifecycle_to_success_acknowledges_the_result() -> None:
    j, _ = J.step(job(), J.Tick(T0, True))
    j, _ = J.step(j, J.Started(1, T0 + 1))
    j, _ = J.step(j, J.Progressed(1, {"bytes_done": 5}, T0 + 2))
    assert j.phase is J.Phase.RUNNING and j.progress == {"bytes_done": 5}
    j, fx = J.step(j, J.Finished(1, "succeeded", {"snapshot": "s"}, None, T0 + 3))
    assert j.phase is J.Phase.SUCCEEDED and j.result == {"snapshot": "s"} and kinds(fx) == ["SendAck"]


def test_a_duplicate_result_changes_nothing_but_is_acknowledged() -> None:
    done = job(phase=J.Phase.SUCCEEDED, result={"snapshot": "a"}, finished_at=T0)
    j, fx = J.step(done, J.Finished(1, "failed", {}, P.JobError("x", "late"), T0 + 9))
    assert j == done and kinds(fx) == ["SendAck"]


def test_a_transient_failure_is_retried_with_the_next_attempt_and_backoff() -> None:
    j, _ = J.step(job(max_attempts=3), J.Tick(T0, True))
    j, fx = J.step(j, J.Finished(1, "failed", {}, P.JobError("unreachable", "S3 down", True), T0 + 1))
    assert j.phase is J.Phase.QUEUED and j.attempt == 2 and j.not_before == T0 + 3 and kinds(fx) == ["SendAck"]
    assert J.step(j, J.Tick(T0 + 2, True))[0].phase is J.Phase.QUEUED
    j, fx = J.step(j, J.Tick(T0 + 3, True))
    assert j.phase is J.Phase.ASSIGNED and fx == [J.SendRun(j)]
    assert J.step(j, J.Started(1, T0 + 4))[0] == j  # the old attempt's news is ignored


def test_a_permanent_failure_is_final() -> None:
    j, _ = J.step(job(max_attempts=3), J.Tick(T0, True))
    j, _ = J.step(j, J.Finished(1, "failed", {}, P.JobError("conflict", "exists"), T0 + 1))
    assert j.phase is J.Phase.FAILED and j.error == {"kind": "conflict", "message": "exists", "transient": False}


def test_the_deadline_fails_a_job_and_cancels_it_on_the_worker() -> None:
    j, _ = J.step(job(), J.Tick(T0, True))
    j, _ = J.step(j, J.Started(1, T0 + 1))
    j, fx = J.step(j, J.Tick(T0 + 100, False))
    assert j.phase is J.Phase.FAILED and j.error and j.error["kind"] == "deadline" and kinds(fx) == ["SendCancel"]


def test_cancel_is_immediate_when_queued_and_asked_of_the_worker_otherwise() -> None:
    j, fx = J.step(job(), J.CancelRequested(T0))
    assert j.phase is J.Phase.CANCELLED and fx == []
    j, _ = J.step(job(), J.Tick(T0, True))
    j, fx = J.step(j, J.CancelRequested(T0 + 1))
    assert j.phase is J.Phase.ASSIGNED and j.cancel_requested and kinds(fx) == ["SendCancel"]
    j, fx = J.step(j, J.Reconnected(T0 + 2))
    assert kinds(fx) == ["SendRun", "SendCancel"]  # the host came back: it may have missed both
    j, _ = J.step(j, J.Finished(1, "cancelled", {}, None, T0 + 3))
    assert j.phase is J.Phase.CANCELLED


def test_every_active_phase_handles_results_and_cancels() -> None:
    for phase in (J.Phase.QUEUED, J.Phase.ASSIGNED, J.Phase.RUNNING):
        assert (phase, J.Finished) in J.TABLE and (phase, J.CancelRequested) in J.TABLE


# ---------------------------------------------------------------- hosts


def status(state: str, session: str) -> P.Status:
    return P.Status("h1", "online" if state == "online" else "offline", session, T0)


def test_a_late_will_of_an_old_session_does_not_take_a_host_offline() -> None:
    h, came = apply_status(HostState("h1"), status("online", "s2"), T0)
    assert h.online and came
    h, came = apply_status(h, status("offline", "s1"), T0 + 1)
    assert h.online and not came
    h, _ = apply_status(h, status("offline", "s2"), T0 + 2)
    assert h.state == "offline" and h.since == T0 + 2
    h, came = apply_status(h, status("online", "s3"), T0 + 3)
    assert h.online and came


# ---------------------------------------------------------------- migrate


def inventory(host: str, *volumes: P.VolumeEntry) -> P.Inventory:
    return P.Inventory(host, T0, volumes)


def vol(name: str, running: tuple[str, ...] = ()) -> P.VolumeEntry:
    return P.VolumeEntry(name, "local", 1, {}, running, running)


def views(target_has: bool = False, online: bool = True) -> dict[str, M.HostView]:
    return {"h1": M.HostView(True, inventory("h1", vol("v", ("c1",)))),
            "h2": M.HostView(online, inventory("h2", *([vol("v")] if target_has else [])))}


def test_plan_finds_the_source_and_refuses_unsafe_migrations() -> None:
    plan, running = M.plan("v", "h2", None, views())
    assert (plan.source, plan.target, running) == ("h1", "h2", ("c1",))
    with pytest.raises(ConflictError, match="already exists on host h2; use --force"):
        M.plan("v", "h2", None, views(target_has=True))
    assert M.plan("v", "h2", "h1", views(target_has=True), force=True)[0].force
    with pytest.raises(NotFoundError, match="unknown host 'h9'"):
        M.plan("v", "h9", None, views())
    with pytest.raises(UnreachableError, match="host h2 is offline"):
        M.plan("v", "h2", None, views(online=False))
    with pytest.raises(NotFoundError, match="volume w does not exist on host h1"):
        M.plan("w", "h2", "h1", views())
    with pytest.raises(UsageError, match="already on host h1"):
        M.plan("v", "h1", "h1", views())


def drive(m: M.Migration, *outcomes: tuple[str, dict[str, object]], start: float = T0) -> M.Migration:
    for i, (outcome, result) in enumerate(outcomes):
        error = None if outcome == "succeeded" else P.JobError("storage", "boom")
        m, _ = M.on_child(m, m.child or "", outcome, result, error, start + i + 1)  # type: ignore[arg-type]
    return m


def begin(remove_source: bool = False) -> M.Migration:
    m, spawns = M.begin("jm00000001", M.Plan("v", "h1", "h2", remove_source=remove_source), ("c1",), T0)
    assert [(s.kind, s.host) for s in spawns] == [("stop-containers", "h1")]
    return m


STOPPED = ("succeeded", {"stopped": ["c1"], "containers": [{"Id": "c1"}]})
BACKED_UP = ("succeeded", {"snapshot": "abcd"})
RESTORED = ("succeeded", {"created": True})


def test_a_migration_runs_its_steps_and_reports_the_downtime() -> None:
    m = drive(begin(), STOPPED, BACKED_UP, RESTORED, ("succeeded", {"ok": True}))
    assert m.step is M.Step.DONE and m.outcome == "succeeded" and m.snapshot == "abcd"
    report = m.report()
    assert report["downtime_s"] == 3.0 and report["total_s"] == 4.0 and not report["source_removed"]
    assert report["containers"] == [{"Id": "c1"}]


def test_the_source_is_removed_only_after_the_target_verified() -> None:
    m = drive(begin(remove_source=True), STOPPED, BACKED_UP, RESTORED)
    m, spawns = M.on_child(m, m.child or "", "succeeded", {"ok": True}, None, T0 + 9)
    assert [(s.kind, s.host, s.params) for s in spawns] == [("remove-volume", "h1", {"volume": "v"})]
    m = drive(m, ("succeeded", {"removed": True}))
    assert m.outcome == "succeeded" and m.source_removed


def test_a_failed_restore_restarts_the_source_containers() -> None:
    m = drive(begin(), STOPPED, BACKED_UP)
    m, spawns = M.on_child(m, m.child or "", "failed", {}, P.JobError("storage", "disk full"), T0 + 5)
    assert [(s.kind, s.host, s.params) for s in spawns] == [("start-containers", "h1", {"containers": ["c1"]})]
    m = drive(m, ("succeeded", {}), start=T0 + 5)
    assert m.step is M.Step.DONE and m.outcome == "failed" and m.error
    assert "restore on h2 failed: disk full" in m.error["message"]
    assert m.report()["downtime_s"] == 5.0  # until the containers ran again


def test_a_target_that_does_not_verify_is_removed_after_the_source_runs_again() -> None:
    m = drive(begin(), STOPPED, BACKED_UP, RESTORED)
    m, _ = M.on_child(m, m.child or "", "succeeded", {"ok": False, "differences": ["a: missing"]}, None, T0 + 5)
    assert m.step is M.Step.ROLLBACK_START
    m, spawns = M.on_child(m, m.child or "", "succeeded", {}, None, T0 + 6)
    assert [(s.kind, s.host) for s in spawns] == [("remove-volume", "h2")]
    m = drive(m, ("succeeded", {}))
    assert m.outcome == "failed" and m.error and "differs from the snapshot: a: missing" in m.error["message"]


def test_a_lost_stop_job_restarts_what_was_running_when_planned() -> None:
    m = drive(begin(), ("failed", {}))
    assert m.step is M.Step.ROLLBACK_START
    _, spawns = M.on_child(begin(), "jm00000001-1", "failed", {}, None, T0)
    assert spawns[0].params == {"containers": ["c1"]}


def test_cancel_rolls_back_and_comes_too_late_after_verification() -> None:
    m = drive(begin(), STOPPED)
    m, child = M.cancel(m)
    assert child == m.child and m.cancel
    m = drive(m, BACKED_UP, ("succeeded", {}))
    assert m.outcome == "cancelled" and m.step is M.Step.DONE
    done = drive(begin(remove_source=True), STOPPED, BACKED_UP, RESTORED, ("succeeded", {"ok": True}))
    assert M.cancel(done) == (done, None)


def test_results_of_other_children_are_ignored_and_state_round_trips() -> None:
    m = drive(begin(), STOPPED)
    assert M.on_child(m, "jm00000001-1", "failed", {}, None, T0) == (m, [])
    assert M.Migration.from_dict(json.loads(json.dumps(m.as_dict()))) == m
