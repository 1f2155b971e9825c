"""The deployment files work as shipped: docker-compose.yml passes Compose's own
validation, deploy/mosquitto's configuration runs on a real Mosquitto whose ACLs,
passwords and TLS do what they claim, the systemd units pass systemd-analyze, and
every setting the programs read is documented.

The broker runs the shipped mosquitto.conf with only its paths and listener
address rewritten, with certificates from make-certs.sh and accounts from
add-host.sh; clients are the real mosquitto_pub/mosquitto_sub.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_or_skip

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MOSQ = DEPLOY / "mosquitto"
SERVICES = {"broker", "s3", "service", "worker"}
TIMEOUT = 20.0


def tool(name: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name) if p.is_file()), None
    )
    if found is None:
        require_or_skip(name)
    assert found is not None
    return found


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("timeout", TIMEOUT)
    return subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)


# ------------------------------------------------------------------ compose


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    require_or_skip("docker compose or docker-compose")
    raise AssertionError("unreachable")


def compose_env(tmp_path: Path) -> tuple[dict[str, str], list[str]]:
    """No stray settings: an empty env file instead of a .env the user may have."""
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "DOCKER_HOST")
    return {k: v for k, v in os.environ.items() if k in keep}, ["--env-file", str(env_file)]


def compose_config(tmp_path: Path) -> dict[str, Any]:
    """The normalized configuration, as Compose itself parsed and validated it."""
    cmd = compose_command()
    env, env_args = compose_env(tmp_path)
    base = [*cmd, "-f", str(ROOT / "docker-compose.yml"), *env_args]
    if cmd[-1] == "compose":  # v2 prints JSON itself
        out = run([*base, "config", "--format", "json"], env=env, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))
    out = run([*base, "config"], env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    # docker-compose 1.x prints YAML; its own interpreter has PyYAML.
    interpreter = Path(shutil.which("docker-compose") or "").read_text().splitlines()[0].removeprefix("#!").split()
    to_json = run([*interpreter, "-c", "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))"],
                  input=out.stdout)
    assert to_json.returncode == 0, to_json.stderr
    return dict(json.loads(to_json.stdout))


def test_compose_file_is_valid_and_has_the_four_services(tmp_path: Path) -> None:
    cmd = compose_command()
    env, env_args = compose_env(tmp_path)
    out = run([*cmd, "-f", str(ROOT / "docker-compose.yml"), *env_args, "config", "--services"], env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert set(out.stdout.split()) == SERVICES


def test_compose_validation_is_real(tmp_path: Path) -> None:
    """The same check refuses a broken copy: it is not accepting anything."""
    broken = tmp_path / "docker-compose.yml"
    text = (ROOT / "docker-compose.yml").read_text()
    assert "    pid: host\n" in text
    broken.write_text(text.replace("    pid: host\n", "    pid: [host]\n"))
    env, env_args = compose_env(tmp_path)
    out = run([*compose_command(), "-f", str(broken), *env_args, "config", "-q"], env=env, cwd=tmp_path)
    assert out.returncode != 0
    assert "pid" in out.stderr


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of a normalized service's volumes (long or short syntax)."""
    found = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            source, target = v.get("source", ""), v["target"]
        found[target] = source
    return found


def _port_targets(service: dict[str, Any]) -> list[str]:
    """Container ports a normalized service publishes ("ip:host:container/proto" or long syntax)."""
    return [p.rpartition(":")[2].partition("/")[0] if isinstance(p, str) else str(p["target"])
            for p in service.get("ports", [])]


def test_compose_services_are_wired_as_documented(tmp_path: Path) -> None:
    services = compose_config(tmp_path)["services"]
    assert set(services) == SERVICES
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"

    broker = services["broker"]
    assert broker["image"].startswith("eclipse-mosquitto:2")
    assert Path(_mounts(broker)["/mosquitto/config"]) == MOSQ
    assert "/mosquitto/data" in _mounts(broker)
    assert _port_targets(broker) == ["8883"]
    # The health check looks for the listener mosquitto.conf opens (8883 = 0x22B3).
    assert "listener 8883\n" in (MOSQ / "mosquitto.conf").read_text()
    assert ":22B3 " in " ".join(broker["healthcheck"]["test"])

    worker, service = services["worker"], services["service"]
    assert worker["pid"] == "host"
    assert str(worker["user"]).split(":")[0] in ("0", "root")
    assert _mounts(worker)["/var/run/docker.sock"] == "/var/run/docker.sock"
    assert "/var/lib/volmove" in _mounts(worker)
    for svc, program in ((worker, "volmove-worker"), (service, "volmove-service")):
        assert svc["command"] == [program]
        assert Path(svc["build"]["context"]).resolve() == ROOT
        assert (ROOT / svc["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        env = svc["environment"]
        assert env["VOLMOVE_BROKER"].startswith("mqtts://broker:8883")
        assert Path(_mounts(svc)[env["VOLMOVE_BROKER_CA"]]) == MOSQ / "certs" / "ca.crt"
        assert env["AWS_ENDPOINT_URL"] == "http://s3:9000"
        assert env["VOLMOVE_STATE_DIR"] in _mounts(svc)
    senv = service["environment"]
    assert Path(senv["VOLMOVE_SERVICE_DB"]).parent == Path(senv["VOLMOVE_STATE_DIR"])
    listen_port = senv["VOLMOVE_SERVICE_LISTEN"].rpartition(":")[2]
    assert _port_targets(service) == [listen_port]
    # A worker's broker account is its host's name: the ACL pattern relies on it.
    assert worker["environment"]["VOLMOVE_BROKER_USER"] == worker["environment"]["VOLMOVE_HOST"]
    assert service["environment"]["VOLMOVE_BROKER_USER"] == "volmove-service"


def test_compose_setup_makes_every_file_the_broker_config_names(tmp_path: Path) -> None:
    """compose-setup.sh (in a copy) makes exactly what mosquitto.conf reads and .env supplies."""
    tool("openssl")
    tool("mosquitto_passwd")
    copy = tmp_path / "checkout"
    shutil.copytree(DEPLOY, copy / "deploy", ignore=shutil.ignore_patterns("ca", "certs", "passwd"))
    env = {**os.environ, "VOLMOVE_HOST": "hostx"}
    out = run(["sh", str(copy / "deploy" / "compose-setup.sh")], env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    conf = (copy / "deploy/mosquitto/mosquitto.conf").read_text()
    named = re.findall(r"^\w+ /mosquitto/config/(\S+)$", conf, re.M)
    assert sorted(named) == ["acl", "certs/ca.crt", "certs/server.crt", "certs/server.key", "passwd"]
    for rel in named:
        assert (copy / "deploy/mosquitto" / rel).is_file(), rel
    assert not (copy / "deploy/mosquitto/certs/ca.key").exists()  # the CA key stays off the broker
    dotenv = dict(line.split("=", 1) for line in (copy / ".env").read_text().splitlines() if "=" in line)
    assert dotenv["VOLMOVE_HOST"] == "hostx"
    users = {line.split(":")[0] for line in (copy / "deploy/mosquitto/passwd").read_text().splitlines()}
    assert users == {"volmove-service", "hostx"}
    for key in ("VOLMOVE_SERVICE_BROKER_PASSWORD", "VOLMOVE_WORKER_BROKER_PASSWORD", "S3_SECRET_KEY",
                "VOLMOVE_SERVICE_TOKEN"):
        assert len(dotenv[key]) >= 24
    # Run again: the secrets are kept, so running containers keep working.
    again = run(["sh", str(copy / "deploy" / "compose-setup.sh")], env=env, timeout=60)
    assert again.returncode == 0, again.stderr
    assert dict(line.split("=", 1) for line in (copy / ".env").read_text().splitlines() if "=" in line) == dotenv


# ------------------------------------------------------------------ image


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", dockerfile, re.M)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}$", dockerfile, re.M)
    sources = [s for line in re.findall(r"^COPY (.+)$", dockerfile, re.M) for s in line.split()[:-1]]
    assert "pyproject.toml" in sources and "deploy/healthcheck.py" in sources
    allowed = [line[1:].rstrip("/") for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for src in sources:
        assert (ROOT / src).exists(), src
        assert src in allowed, f"{src} is excluded from the build context"
    # The packages pyproject builds are all copied.
    for pkg in re.findall(r'"(\w+)/volmove"', (ROOT / "pyproject.toml").read_text()):
        assert pkg in sources, pkg


# ------------------------------------------------------------------ settings


def _documented() -> set[str]:
    text = (DEPLOY / "volmove.env.example").read_text()
    return set(re.findall(r"^#?([A-Z][A-Z0-9_]*)=", text, re.M))


def test_every_setting_the_programs_read_is_documented() -> None:
    used = set()
    for part in ("core", "cli", "workers", "service"):
        for path in (ROOT / part).rglob("*.py"):
            used |= set(re.findall(r'"(VOLMOVE_[A-Z0-9_]+)"', path.read_text()))
    used = {name for name in used if not name.startswith("VOLMOVE_TEST")}
    assert "VOLMOVE_REPO" in used  # the scan finds what it should
    assert used <= _documented(), f"undocumented in deploy/volmove.env.example: {sorted(used - _documented())}"


def test_every_setting_compose_gives_the_programs_is_documented() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    keys = set(re.findall(r"^\s+((?:VOLMOVE|AWS|DOCKER)_[A-Z0-9_]+):", text, re.M))
    assert {"VOLMOVE_BROKER", "VOLMOVE_HOST", "AWS_SECRET_ACCESS_KEY"} <= keys
    assert keys <= _documented(), sorted(keys - _documented())


# ------------------------------------------------------------------ systemd


def _unit(name: str) -> dict[str, list[str]]:
    """key -> values (keys may repeat) of a unit file, section-qualified."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in (DEPLOY / "systemd" / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return values


@pytest.mark.parametrize("name", ["volmove-worker.service", "volmove-service.service"])
def test_systemd_unit_has_the_required_settings(name: str) -> None:
    unit = _unit(name)
    program = name.removesuffix(".service")
    assert unit["Service.ExecStart"] == [f"/opt/volmove/bin/{program}"]
    assert unit["Service.EnvironmentFile"][0] == "/etc/volmove/volmove.env"
    assert unit["Service.Restart"] == ["on-failure"]
    assert unit["Install.WantedBy"] == ["multi-user.target"]
    if program == "volmove-worker":
        assert "docker.service" in " ".join(unit["Unit.After"]).split()
        assert unit["Service.User"] == ["root"]
    else:
        assert unit["Service.DynamicUser"] == ["yes"]
        state = "/var/lib/" + unit["Service.StateDirectory"][0]
        assert f"VOLMOVE_SERVICE_DB={state}/service.db" in unit["Service.Environment"]


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    units = []
    for name in ("volmove-worker.service", "volmove-service.service"):
        program = bin_dir / name.removesuffix(".service")
        program.write_text("#!/bin/sh\nexit 0\n")
        program.chmod(0o755)
        text = (DEPLOY / "systemd" / name).read_text()
        assert "/opt/volmove/bin/" in text
        (tmp_path / name).write_text(text.replace("/opt/volmove/bin/", f"{bin_dir}/"))
        units.append(str(tmp_path / name))
    out = run([analyze, "verify", "--man=no", *units], timeout=60)
    # verify exits 0 on unknown keys and bad values too: it must print nothing about our units.
    complaints = [line for line in out.stderr.splitlines() if str(tmp_path) in line or "volmove" in line]
    assert out.returncode == 0 and not complaints, out.stderr
    # And it does complain about a broken copy.
    broken = tmp_path / "broken" / "volmove-worker.service"
    broken.parent.mkdir()
    broken.write_text((tmp_path / "volmove-worker.service").read_text().replace("RestartSec=5s", "RestartSec=soon"))
    out = run([analyze, "verify", "--man=no", str(broken)], timeout=60)
    assert "RestartSec" in out.stderr or "soon" in out.stderr or out.returncode != 0


# ------------------------------------------------------------------ the broker


@dataclass
class Broker:
    dir: Path
    port: int
    proc: subprocess.Popen[bytes]
    passwords: dict[str, str]
    owner: str | None
    log: Path

    @property
    def ca(self) -> str:
        return str(self.dir / "certs" / "ca.crt")

    def client_args(self, user: str | None, password: str | None = None, ca: str | None = None) -> list[str]:
        args = ["-h", "127.0.0.1", "-p", str(self.port), "-V", "5"]
        if ca != "":
            args += ["--cafile", ca or self.ca]
        if user is not None:
            args += ["-u", user, "-P", password if password is not None else self.passwords[user]]
        return args

    def pub(self, user: str | None, topic: str, message: str, *extra: str, **kw: Any
            ) -> subprocess.CompletedProcess[str]:
        args = [tool("mosquitto_pub"), *self.client_args(user, **kw), "-q", "1", "-t", topic, "-m", message, *extra]
        return run(args)

    def add_host(self, name: str) -> str:
        owner = ["--owner", self.owner] if self.owner else []
        out = run(["sh", str(MOSQ / "add-host.sh"), "-f", str(self.dir / "passwd"), *owner, name])
        assert out.returncode == 0, out.stderr
        found = dict(line.split("=", 1) for line in out.stdout.splitlines())
        assert found["VOLMOVE_BROKER_USER"] == name
        return found["VOLMOVE_BROKER_PASSWORD"]

    def reload(self) -> None:
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)  # mosquitto reloads between two loop iterations


@dataclass
class Subscriber:
    """mosquitto_sub in the background; lines 'topic payload' as they arrive."""

    broker: Broker
    user: str
    topic: str
    extra: tuple[str, ...] = ()
    lines: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    reader: threading.Thread | None = None

    def __enter__(self) -> Subscriber:
        args = [tool("mosquitto_sub"), *self.broker.client_args(self.user), "-q", "1", "-v", "-t", self.topic,
                *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None and self.reader is not None and self.proc.stdout is not None
        self.proc.terminate()
        self.proc.wait(timeout=TIMEOUT)
        self.reader.join(timeout=TIMEOUT)
        self.proc.stdout.close()

    def wait_for(self, line: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while line not in self.lines:
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{line!r} never arrived; got {self.lines}")
            time.sleep(0.05)

    def ready(self, publisher: str, topic: str) -> None:
        """Publish probes until one arrives: the subscription is in place."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert self.broker.pub(publisher, topic, "probe").returncode == 0
            try:
                self.wait_for(f"{topic} probe", timeout=0.5)
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _broker_user() -> str | None:
    """Mosquitto started as root drops to `mosquitto` (else `nobody`): give it its files."""
    if os.geteuid() != 0:
        return None
    for name in ("mosquitto", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return f"{entry.pw_uid}:{entry.pw_gid}"
    return None


def _test_config(workdir: Path, port: int) -> str:
    """The shipped mosquitto.conf with its paths and listener moved into ``workdir``."""
    text = (MOSQ / "mosquitto.conf").read_text()
    rewrites = [
        ("/mosquitto/config/", f"{workdir}/"),
        ("/mosquitto/data/", f"{workdir}/data/"),
        ("\nlistener 8883\n", f"\nlistener {port} 127.0.0.1\n"),
    ]
    for old, new in rewrites:
        assert old in text, old
        text = text.replace(old, new)
    assert "/mosquitto/" not in re.sub(r"#.*", "", text)
    return text


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    mosquitto = tool("mosquitto")
    for name in ("mosquitto_pub", "mosquitto_sub", "mosquitto_passwd", "openssl"):
        tool(name)
    # Not under pytest's tmp_path: its parents are private to root, and mosquitto drops root.
    workdir = Path(tempfile.mkdtemp(prefix="volmove-deploy-"))
    workdir.chmod(0o755)
    owner = _broker_user()
    owner_args = ["--owner", owner] if owner else []
    try:
        certs = run(["sh", str(MOSQ / "make-certs.sh"), *owner_args, "--ca-dir", str(workdir / "ca"),
                     str(workdir / "certs"), "localhost", "127.0.0.1"], timeout=60)
        assert certs.returncode == 0, certs.stderr
        shutil.copy(MOSQ / "acl", workdir / "acl")
        (workdir / "data").mkdir()
        if owner:
            uid, gid = (int(x) for x in owner.split(":"))
            os.chown(workdir / "data", uid, gid)
        port = _free_port()
        (workdir / "mosquitto.conf").write_text(_test_config(workdir, port))
        b = Broker(workdir, port, None, {}, owner, workdir / "broker.log")  # type: ignore[arg-type]
        for host in ("host1", "host2"):
            b.passwords[host] = b.add_host(host)
        out = run(["sh", str(MOSQ / "add-host.sh"), "-f", str(workdir / "passwd"), *owner_args, "--service"])
        assert out.returncode == 0, out.stderr
        b.passwords["volmove-service"] = out.stdout.splitlines()[1].split("=", 1)[1]
        with b.log.open("wb") as log:
            b.proc = subprocess.Popen([mosquitto, "-c", str(workdir / "mosquitto.conf")], stdout=log, stderr=log)
        try:
            _wait_listening(b)
            yield b
        finally:
            b.proc.terminate()
            b.proc.wait(timeout=TIMEOUT)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_listening(b: Broker) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        if b.proc.poll() is not None:
            raise AssertionError(f"mosquitto refused the configuration:\n{b.log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", b.port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"mosquitto does not listen:\n{b.log.read_text()}") from None
            time.sleep(0.1)


def _denied(out: subprocess.CompletedProcess[str]) -> bool:
    """mosquitto_pub -V 5 -q 1 prints the PUBACK's reason code; the exit status stays 0."""
    return "Publish 1 failed: Not authorized" in out.stderr


@pytest.mark.mqtt
def test_host_publishes_under_its_own_topics_only(broker: Broker) -> None:
    with Subscriber(broker, "volmove-service", "volmove/v1/#") as sub:
        sub.ready("volmove-service", "volmove/v1/service/probe")
        for topic in ("volmove/v1/hosts/host2/status",  # another host's status
                      "volmove/v1/hosts/host2/events",  # another host's job results
                      "volmove/v1/cmd/host2",  # jobs for another host
                      "volmove/v1/cmd/host1",  # jobs for itself: only the service sends those
                      "volmove/v1/hosts",
                      "volmove/v1/elsewhere"):
            out = broker.pub("host1", topic, "forged-by-host1")
            assert _denied(out), (topic, out.stderr)
        # Published after the forged ones on one subscriber connection: its arrival means
        # anything published before it that was going to be delivered has been.
        for kind in ("inventory", "events", "status"):
            own = broker.pub("host1", f"volmove/v1/hosts/host1/{kind}", f"{kind}-of-host1")
            assert own.returncode == 0 and not _denied(own), own.stderr
        sub.wait_for("volmove/v1/hosts/host1/status status-of-host1")
        assert "volmove/v1/hosts/host1/inventory inventory-of-host1" in sub.lines
        assert not [line for line in sub.lines if "forged" in line], sub.lines


@pytest.mark.mqtt
def test_host_reads_only_its_own_topics(broker: Broker) -> None:
    with Subscriber(broker, "host1", "volmove/v1/#") as sub:
        sub.ready("volmove-service", "volmove/v1/cmd/host1")
        for topic, message in (("volmove/v1/cmd/host2", "job-for-host2"),
                               ("volmove/v1/hosts/host2/status", "status-of-host2"),
                               ("volmove/v1/service/x", "for-the-service"),
                               ("volmove/v1/cmd/host1", "job-for-host1")):
            assert broker.pub("volmove-service", topic, message).returncode == 0
        sub.wait_for("volmove/v1/cmd/host1 job-for-host1")
        leaked = [line for line in sub.lines if "host2" in line or "for-the-service" in line]
        assert not leaked, sub.lines


@pytest.mark.mqtt
def test_last_will_only_on_own_status(broker: Broker) -> None:
    """A worker's Will marks its host offline; no host can leave one for another host.

    Mosquitto 2.0 accepts the connection and checks the Will when it fires: kill
    the clients (no DISCONNECT) and see which Will is delivered.
    """
    def will(topic: str, payload: str) -> tuple[str, ...]:
        return ("--will-topic", topic, "--will-payload", payload, "--will-qos", "1")

    with Subscriber(broker, "volmove-service", "volmove/v1/hosts/#") as sub:
        sub.ready("volmove-service", "volmove/v1/hosts/probe/x")
        for will_topic, payload in (("volmove/v1/hosts/host2/status", "forged-will"),
                                    ("volmove/v1/hosts/host1/status", "will-of-host1")):
            with Subscriber(broker, "host1", "volmove/v1/cmd/host1", will(will_topic, payload)) as worker:
                worker.ready("volmove-service", "volmove/v1/cmd/host1")
                assert worker.proc is not None
                worker.proc.kill()
        sub.wait_for("volmove/v1/hosts/host1/status will-of-host1")
        assert not [line for line in sub.lines if "forged" in line], sub.lines


@pytest.mark.mqtt
@pytest.mark.parametrize(
    ("user", "password"),
    [("host1", "wrong-password"), ("host1", ""), ("no-such-host", "whatever"), (None, None)],
    ids=["wrong-password", "empty-password", "unknown-user", "anonymous"],
)
def test_bad_credentials_are_refused(broker: Broker, user: str | None, password: str | None) -> None:
    out = broker.pub(user, "volmove/v1/hosts/host1/status", "x", password=password)
    assert out.returncode != 0
    assert "not authori" in out.stderr.lower(), out.stderr


@pytest.mark.mqtt
def test_listener_is_tls_with_the_made_ca(broker: Broker, tmp_path: Path) -> None:
    # The right CA: the certificate verifies, for the address used.
    s_client = run([tool("openssl"), "s_client", "-connect", f"127.0.0.1:{broker.port}", "-CAfile", broker.ca,
                    "-verify_return_error", "-verify_ip", "127.0.0.1", "-brief"], input="")
    assert s_client.returncode == 0, s_client.stderr
    assert "Verification: OK" in s_client.stderr
    assert re.search(r"Protocol version: TLSv1\.[23]", s_client.stderr), s_client.stderr
    # Another CA: the client refuses the broker.
    other = run(["sh", str(MOSQ / "make-certs.sh"), str(tmp_path / "other"), "localhost"], timeout=60)
    assert other.returncode == 0, other.stderr
    refused = broker.pub("host1", "volmove/v1/hosts/host1/status", "x", ca=str(tmp_path / "other" / "ca.crt"))
    assert refused.returncode != 0
    # Plain MQTT: no listener speaks it.
    plain = broker.pub("host1", "volmove/v1/hosts/host1/status", "x", ca="")
    assert plain.returncode != 0


@pytest.mark.mqtt
def test_added_host_gets_in_after_a_reload_with_no_acl_edit(broker: Broker) -> None:
    acl_before = (broker.dir / "acl").read_bytes()
    password = broker.add_host("host3")
    broker.passwords["host3"] = password
    broker.reload()
    with Subscriber(broker, "volmove-service", "volmove/v1/hosts/#") as sub:
        sub.ready("volmove-service", "volmove/v1/hosts/probe/x")
        assert _denied(broker.pub("host3", "volmove/v1/hosts/host1/status", "forged-by-host3"))
        assert broker.pub("host3", "volmove/v1/hosts/host3/status", "online").returncode == 0
        sub.wait_for("volmove/v1/hosts/host3/status online")
        assert not [line for line in sub.lines if "forged" in line]
    assert (broker.dir / "acl").read_bytes() == acl_before
    # Removed: refused after the next reload.
    owner = ["--owner", broker.owner] if broker.owner else []
    out = run(["sh", str(MOSQ / "add-host.sh"), "-f", str(broker.dir / "passwd"), *owner, "--remove", "host3"])
    assert out.returncode == 0, out.stderr
    broker.reload()
    assert "not authori" in broker.pub("host3", "volmove/v1/hosts/host3/status", "x").stderr.lower()


@pytest.mark.mqtt
def test_add_host_refuses_names_that_would_escape_the_acl(broker: Broker) -> None:
    for name in ("host/evil", "+", "#", "-rf", "volmove-service", "a b"):
        out = run(["sh", str(MOSQ / "add-host.sh"), "-f", str(broker.dir / "passwd"), name])
        assert out.returncode != 0, name
    users = {line.split(":")[0] for line in (broker.dir / "passwd").read_text().splitlines()}
    assert users <= {"host1", "host2", "host3", "volmove-service"}


@pytest.mark.mqtt
def test_container_healthcheck_sees_the_broker_connection(broker: Broker) -> None:
    check = [sys.executable, str(DEPLOY / "healthcheck.py")]
    url = f"mqtts://127.0.0.1:{broker.port}"
    assert run([*check, url]).returncode == 1  # nobody is connected yet
    with Subscriber(broker, "host2", "volmove/v1/hosts/host2/#") as sub:
        sub.ready("host2", "volmove/v1/hosts/host2/probe")
        assert run([*check, url]).returncode == 0
        assert run(check, env={**os.environ, "VOLMOVE_BROKER": url}).returncode == 0
    assert run([*check, f"mqtts://127.0.0.1:{_free_port()}"]).returncode == 1
    assert run([*check, "http://example.net"]).returncode == 2


# ------------------------------------------------------------------ the real programs


@dataclass
class Program:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=TIMEOUT)


def _spawn(name: str, argv: list[str], env: dict[str, str], workdir: Path) -> Program:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Program(name, proc, log)


def _wait_for_host(cli: list[str], env: dict[str, str], host: str, programs: list[Program]) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        out = run([*cli, "hosts", "--json"], env=env)
        if out.returncode == 0:
            hosts = {h["name"]: h for h in json.loads(out.stdout)}
            if hosts.get(host, {}).get("state") == "online":
                return dict(hosts[host])
        dead = [p for p in programs if p.proc.poll() is not None]
        if dead or time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.log.read_text()[-3000:]}" for p in programs)
            raise AssertionError(f"{host} never showed online: {out.stdout} {out.stderr}\n{logs}")
        time.sleep(0.5)


@pytest.mark.mqtt
@pytest.mark.docker
def test_worker_and_service_run_a_job_through_the_deploy_broker(broker: Broker, docker_url: str,
                                                               tmp_path: Path) -> None:
    """The real volmove-worker and volmove-service, with the shipped broker config,
    ACLs and TLS and their own accounts: the host comes online and a backup job
    goes service -> cmd/host1 -> worker -> hosts/host1/events -> service."""
    bin_dir = Path(sys.executable).parent
    programs = {name: bin_dir / name for name in ("volmove", "volmove-worker", "volmove-service")}
    if not all(p.is_file() for p in programs.values()):
        require_or_skip("volmove installed in the test's virtualenv")
    docker = tool("docker")
    base = {**os.environ, "VOLMOVE_BROKER": f"mqtts://127.0.0.1:{broker.port}", "VOLMOVE_BROKER_CA": broker.ca,
            "VOLMOVE_REPO": str(tmp_path / "repo"), "VOLMOVE_MAX_BACKOFF": "1", "DOCKER_HOST": docker_url,
            "VOLMOVE_LOG": "INFO"}
    base.pop("VOLMOVE_SERVICE", None)
    assert run([str(programs["volmove"]), "init"], env=base, timeout=60).returncode == 0
    volume = f"vmdeploy-{os.urandom(4).hex()}"
    assert run([docker, "-H", docker_url, "volume", "create", volume]).returncode == 0
    api_port, token = _free_port(), os.urandom(16).hex()
    started: list[Program] = []
    try:
        started.append(_spawn("worker", [str(programs["volmove-worker"])], {
            **base, "VOLMOVE_HOST": "host1", "VOLMOVE_BROKER_USER": "host1",
            "VOLMOVE_BROKER_PASSWORD": broker.passwords["host1"], "VOLMOVE_STATE_DIR": str(tmp_path / "worker")},
            tmp_path))
        started.append(_spawn("service", [str(programs["volmove-service"])], {
            **base, "VOLMOVE_BROKER_USER": "volmove-service",
            "VOLMOVE_BROKER_PASSWORD": broker.passwords["volmove-service"],
            "VOLMOVE_SERVICE_LISTEN": f"127.0.0.1:{api_port}", "VOLMOVE_SERVICE_TOKEN": token,
            "VOLMOVE_SERVICE_DB": str(tmp_path / "service" / "service.db")}, tmp_path))
        cli_env = {**base, "VOLMOVE_SERVICE": f"http://127.0.0.1:{api_port}", "VOLMOVE_SERVICE_TOKEN": token}
        cli = [str(programs["volmove"])]
        _wait_for_host(cli, cli_env, "host1", started)
        backup = run([*cli, "backup", volume, "--host", "host1", "--json"], env=cli_env, timeout=60)
        assert backup.returncode == 0, (backup.stdout, backup.stderr)
        snapshots = run([*cli, "snapshots", volume, "--json"], env=base, timeout=60)
        assert snapshots.returncode == 0, snapshots.stderr
        assert volume in snapshots.stdout
    finally:
        for program in reversed(started):
            program.stop()
        run([docker, "-H", docker_url, "volume", "rm", "-f", volume])
