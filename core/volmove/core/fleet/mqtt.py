"""The MQTT adapter (the fleet's one IO module): a session that reconnects with backoff.

aiomqtt and paho exceptions are translated here: refused credentials become
AuthError (fatal: retrying cannot help and would storm the broker), anything
else UnreachableError (retried with exponential backoff and jitter).

aiomqtt 2.x acknowledges a QoS 1 message before ``on_message`` runs, so
receivers must record what they need durably and be idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import unquote, urlsplit

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from volmove.core.errors import AuthError, UnreachableError, UsageError, VolmoveError

log = logging.getLogger(__name__)

DEFAULT_PORT, DEFAULT_TLS_PORT = 1883, 8883
SESSION_EXPIRY = 24 * 3600  # the broker keeps a disconnected client's subscriptions and queued messages this long
PUBLISH_TIMEOUT = 5.0
PUBLISH_IN_FLIGHT_WARNING = 1000
_AUTH_CODES = frozenset({4, 5, 134, 135})  # MQTT 3.1.1 and 5 codes for refused credentials

MessageHandler = Callable[[str, bytes, bool], Awaitable[None]]
ConnectHandler = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    keepalive: int = 10

    @classmethod
    def from_url(cls, url: str, *, username: str | None = None, password: str | None = None,
                 ca_file: str | None = None, keepalive: int = 10) -> BrokerConfig:
        """``mqtt://[user[:password]@]host[:port]`` or ``mqtts://…`` (TLS)."""
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise UsageError(f"invalid broker URL {url!r}: use mqtt://host:port or mqtts://host:port")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (DEFAULT_TLS_PORT if tls else DEFAULT_PORT)
        except ValueError as exc:
            raise UsageError(f"invalid broker URL {url!r}: {exc}") from None
        user = username or (unquote(parts.username) if parts.username else None)
        secret = password or (unquote(parts.password) if parts.password else None)
        return cls(parts.hostname, port, user, secret, tls, ca_file, keepalive)

    def describe(self) -> str:
        """The broker's address for messages; never the password."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class Backoff:
    initial: float = 0.5
    maximum: float = 30.0

    def delay(self, failures: int, jitter: float) -> float:
        """Exponential with full jitter in [50 %, 100 %] (``jitter`` in [0, 1))."""
        base = min(self.maximum, self.initial * 2 ** max(0, failures - 1))
        return float(base * (0.5 + jitter / 2))


@dataclass(frozen=True)
class WillMessage:
    topic: str
    payload: bytes
    retain: bool = True


def _reraise_cancellation() -> None:
    """A disconnect error raised while we were being cancelled replaces the CancelledError: restore it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def translate(exc: BaseException, cfg: BrokerConfig) -> VolmoveError:
    """An aiomqtt/paho/socket error as a volmove error.

    Only a refused CONNECT (CONNACK) means refused credentials: other paho codes
    share the small integers (4 is also "not connected") and are transient.
    """
    if isinstance(exc, MqttConnectError) and _code(exc.rc) in _AUTH_CODES:
        who = f"user {cfg.username!r}" if cfg.username else "an anonymous client"
        return AuthError(f"the MQTT broker at {cfg.describe()} refused {who}: {_reason(exc)} "
                         f"(check the broker user name and password)")
    return UnreachableError(f"cannot reach the MQTT broker at {cfg.describe()}: {_reason(exc)}")


def _code(rc: object) -> object:
    return rc.value if isinstance(rc, ReasonCode) else rc


def _reason(exc: BaseException) -> str:
    rc = getattr(exc, "rc", None)
    if isinstance(rc, ReasonCode):
        return str(rc)
    return str(exc) or type(exc).__name__


class Link:
    """One MQTT session, kept up for the life of the process.

    ``run()`` connects, subscribes, calls ``on_connect`` and feeds every message
    to ``on_message``; on a lost connection it reconnects with backoff. Use
    ``publish`` from anywhere: it raises UnreachableError while disconnected.
    """

    def __init__(self, cfg: BrokerConfig, client_id: str, *, subscriptions: Sequence[str] = (),
                 on_message: MessageHandler | None = None, on_connect: ConnectHandler | None = None,
                 will: WillMessage | None = None, backoff: Backoff = Backoff()) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.subscriptions = tuple(subscriptions)
        self.on_message = on_message
        self.on_connect = on_connect
        self.will = will
        self.backoff = backoff
        self.connected = asyncio.Event()
        self.connections = 0
        self._client: aiomqtt.Client | None = None

    async def run(self) -> NoReturn:
        failures = 0
        while True:
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                error = translate(exc, self.cfg)
                if isinstance(error, AuthError):
                    raise error from None
                failures = 1 if self.connected.is_set() else failures + 1
                log.warning("%s (%s); reconnecting", error, self.client_id)
            except UnreachableError as exc:  # a publish in on_connect met a dropped connection
                failures = 1 if self.connected.is_set() else failures + 1
                log.warning("%s (%s); reconnecting", exc, self.client_id)
            finally:
                self.connected.clear()
                self._client = None
            _reraise_cancellation()
            await asyncio.sleep(self.backoff.delay(failures, random.random()))

    async def connect_once(self) -> None:
        """Connect and disconnect: a start-up check that fails fast with a clear error."""
        try:
            async with self._make_client(probe=True):
                return
        except aiomqtt.MqttError as exc:
            raise translate(exc, self.cfg) from None

    async def _session(self) -> None:
        async with self._make_client() as client:
            for topic in self.subscriptions:
                await client.subscribe(topic, qos=1)
            self._client = client
            self.connections += 1
            self.connected.set()
            log.info("connected to %s as %s", self.cfg.describe(), self.client_id)
            if self.on_connect is not None:
                await self.on_connect()
            async for msg in client.messages:
                if self.on_message is not None:
                    payload = msg.payload if isinstance(msg.payload, bytes | bytearray) else str(msg.payload).encode()
                    await self.on_message(str(msg.topic), bytes(payload), bool(msg.retain))

    def _make_client(self, probe: bool = False) -> aiomqtt.Client:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0 if probe else SESSION_EXPIRY
        will = self.will
        client = aiomqtt.Client(
            self.cfg.host, self.cfg.port, username=self.cfg.username, password=self.cfg.password,
            identifier=f"{self.client_id}-probe" if probe else self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5, keepalive=self.cfg.keepalive, timeout=PUBLISH_TIMEOUT,
            clean_start=probe,  # a persistent session: the broker queues QoS 1 messages while we are away
            properties=props,
            will=aiomqtt.Will(will.topic, will.payload, qos=1, retain=will.retain) if will and not probe else None,
            tls_context=self._tls_context(),
        )
        client.pending_calls_threshold = PUBLISH_IN_FLIGHT_WARNING  # many in flight is the design, not a leak
        return client

    def _tls_context(self) -> ssl.SSLContext | None:
        if not self.cfg.tls:
            return None
        return ssl.create_default_context(cafile=self.cfg.ca_file)

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        client = self._client
        if client is None:
            raise UnreachableError(f"not connected to the MQTT broker at {self.cfg.describe()}")
        try:
            await client.publish(topic, payload, qos=qos, retain=retain)
        except aiomqtt.MqttError as exc:
            raise translate(exc, self.cfg) from None
