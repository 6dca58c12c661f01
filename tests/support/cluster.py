"""A real local Redis Cluster for tests: three primaries with one replica each, on
loopback ports, that a test can break (kill a primary) and heal again."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.support.redis import RedisProcess, free_port, redis_binary

PRIMARIES = 3
SLOTS = 16384
#: Short, so a killed primary is failed over in a couple of seconds; long enough that a
#: busy two-core machine does not see false failures.
NODE_TIMEOUT_MS = 1500


@dataclass(frozen=True)
class NodeInfo:
    """One line of CLUSTER NODES."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[tuple[int, int], ...]

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return "fail" in self.flags or "fail?" in self.flags

    def owns(self, slot: int) -> bool:
        return any(lo <= slot <= hi for lo, hi in self.slots)


def parse_cluster_nodes(text: str) -> list[NodeInfo]:
    nodes = []
    for line in text.strip().splitlines():
        parts = line.split()
        node_id, addr, flags, master = parts[0], parts[1], parts[2], parts[3]
        port = int(addr.split("@")[0].rsplit(":", 1)[1])
        slots = []
        for spec in parts[8:]:
            if spec.startswith("["):  # a slot being migrated; not used here
                continue
            lo, _, hi = spec.partition("-")
            slots.append((int(lo), int(hi or lo)))
        nodes.append(
            NodeInfo(
                node_id,
                port,
                frozenset(flags.split(",")),
                None if master == "-" else master,
                tuple(slots),
            )
        )
    return nodes


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"cluster: {what} not reached within {timeout}s")


class LocalCluster:
    """Six redis-server processes joined into one cluster with ``redis-cli --cluster
    create``. Every node uses an explicit bus port, so any free port works."""

    def __init__(self, workdir: Path, *, replicas: int = 1) -> None:
        self.workdir = workdir
        #: Replicas per primary (three primaries).
        self.replicas = replicas
        self.node_count = PRIMARIES * (1 + replicas)
        self.procs: dict[int, RedisProcess] = {}

    # --- lifecycle -----------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> LocalCluster:
        try:
            for _ in range(self.node_count):
                port = free_port()
                proc = RedisProcess(
                    self.workdir,
                    port=port,
                    args=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-port",
                        str(free_port()),
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        str(NODE_TIMEOUT_MS),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ],
                )
                self.procs[port] = proc.start()
            cli = str(Path(redis_binary()).with_name("redis-cli"))
            subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{p}" for p in self.procs),
                    "--cluster-replicas",
                    str(self.replicas),
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=timeout,
            )
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop(kill=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kill(self, port: int) -> None:
        """kill -9: no chance to hand anything over."""
        self.procs[port].stop(kill=True)

    def alive(self, port: int) -> bool:
        proc = self.procs[port].proc
        return proc is not None and proc.poll() is None

    def heal(self, timeout: float = 30.0) -> None:
        """Restart dead nodes (they rejoin from nodes.conf, now as replicas) and wait
        until the cluster is whole again."""
        for port, proc in self.procs.items():
            if not self.alive(port):
                proc.start()
        self.wait_healthy(timeout)

    # --- inspection ----------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        return list(self.procs)

    @property
    def seed_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def live_seed_url(self) -> str:
        return f"redis://127.0.0.1:{self._any()}"

    def client(self, port: int) -> redis.Redis:
        """A plain (non-cluster) client for one node, for admin commands."""
        return redis.Redis(port=port, decode_responses=True, socket_timeout=2.0)

    def node_call(self, port: int, *args: str) -> str:
        with self.client(port) as c:
            reply = c.execute_command(*args)
        return reply if isinstance(reply, str) else str(reply)

    def info(self, port: int) -> dict[str, str]:
        text = self.node_call(port, "CLUSTER", "INFO")
        return dict(line.split(":", 1) for line in text.strip().splitlines() if ":" in line)

    def nodes(self, via: int | None = None) -> list[NodeInfo]:
        port = via if via is not None else self._any()
        return parse_cluster_nodes(self.node_call(port, "CLUSTER", "NODES"))

    def primaries(self) -> list[NodeInfo]:
        return [n for n in self.nodes() if n.is_primary and not n.failed and n.slots]

    def primary_for_slot(self, slot: int) -> NodeInfo:
        return next(n for n in self.primaries() if n.owns(slot))

    def keyslot(self, key: str) -> int:
        return int(self.node_call(self._any(), "CLUSTER", "KEYSLOT", key))

    def _any(self) -> int:
        return next(p for p in self.ports if self.alive(p))

    def state_ok(self, ports: list[int] | None = None) -> bool:
        ports = ports if ports is not None else [p for p in self.ports if self.alive(p)]
        return all(self.info(p).get("cluster_state") == "ok" for p in ports)

    def _healthy(self) -> bool:
        if not all(self.alive(p) for p in self.ports):
            return False
        if not self.state_ok():
            return False
        # Every node must see all the nodes, none failed, three primaries that
        # together own every slot, and every replica in sync with its primary, so a
        # failover in a later test has a replica ready to take over.
        for port in self.ports:
            view = self.nodes(via=port)
            if len(view) != self.node_count or any(n.failed for n in view):
                return False
            primaries = [n for n in view if n.is_primary]
            if len(primaries) != PRIMARIES:
                return False
            if sum(hi - lo + 1 for n in primaries for lo, hi in n.slots) != SLOTS:
                return False
        for port in self.ports:
            with self.client(port) as c:
                repl = c.info("replication")
            if repl["role"] == "slave" and repl.get("master_link_status") != "up":
                return False
            if repl["role"] == "master" and int(repl.get("connected_slaves", 0)) != self.replicas:
                return False
        return True

    def wait_healthy(self, timeout: float = 30.0) -> None:
        wait_for("all nodes ok, replicas in sync", self._healthy, timeout)

    def dbsize_by_primary(self) -> dict[int, int]:
        sizes = {}
        for node in self.primaries():
            with self.client(node.port) as c:
                sizes[node.port] = int(c.dbsize())
        return sizes
