"""Hosts for the multi-host tests: Linux network namespaces on one bridge, and the faults a network has.

Every namespace, address and rule is created here and removed by ``Network.close`` (also after a failed test;
and leftovers of an interrupted run are removed before a new one). The addresses (10.231.0.0/24) exist only
inside these namespaces; the bridge lives in a namespace of its own, so the machine's own network is untouched.
A partition is an nftables table in the host's namespace that drops every packet both ways: the peers see a
black hole, no reset and no ICMP, as with a pulled cable or a dead switch port. Loss drops a random share.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.launcher import spawn_stage, wait_ready_file

PREFIX = "orchmh"
SUBNET = "10.231.0"


def available() -> str:
    """Why the multi-host tier cannot run here, or "" when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian: iproute2, nftables)"
    probe = f"{PREFIX}probe{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"cannot create a network namespace: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return ""


def _ip(*args: str, ns: str = "") -> None:
    argv = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


def _nft(ns: str, rules: str) -> None:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"nft in {ns}: {done.stderr.strip()}")


def partition(ns: str) -> None:
    """Drop every packet in and out of namespace ``ns``: a silent partition (no reset, no ICMP)."""
    _nft(
        ns,
        "table inet partition {\n"
        "  chain input { type filter hook input priority -300; policy drop; }\n"
        "  chain output { type filter hook output priority -300; policy drop; }\n"
        "}\n",
    )


def heal(ns: str) -> None:
    _ip("nft", "delete", "table", "inet", "partition", ns=ns)


def loss(ns: str, percent: int) -> None:
    """Drop ``percent`` % of the packets in and out of ``ns`` at random."""
    rule = f"numgen random mod 100 < {percent} drop"
    _nft(
        ns,
        "table inet loss {\n"
        f"  chain input {{ type filter hook input priority -300; policy accept; {rule}; }}\n"
        f"  chain output {{ type filter hook output priority -300; policy accept; {rule}; }}\n"
        "}\n",
    )


# `ip netns exec NS` mounts the files of /etc/netns/NS over /etc: how a host gets its own resolv.conf.
NETNS_ETC = Path("/etc/netns")


def remove_leftovers() -> None:
    """Namespaces (and their /etc files) an interrupted run left behind (deleting one removes its links and rules)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(PREFIX):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    for leftover in NETNS_ETC.glob(f"{PREFIX}*") if NETNS_ETC.is_dir() else ():
        shutil.rmtree(leftover, ignore_errors=True)


@dataclass
class Host:
    network: Network
    name: str
    ns: str
    ip: str
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def exec(self) -> list[str]:
        """The command prefix that runs a command on this host."""
        return ["ip", "netns", "exec", self.ns]

    def start_stage(self, stage: str, env: Mapping[str, str], tag: str = "", timeout_s: float = 60) -> str:
        """Start a stage process here (listening on this host's address) and return where it listens."""
        key = f"{stage}{tag}@{self.name}"
        ready, log = self.network.run_dir / f"{key}.ready", self.network.run_dir / f"{key}.log"
        env = {**env, f"ORCH_{stage.upper()}_HOST": self.ip, f"ORCH_{stage.upper()}_METRICS_PORT": "-1"}
        popen = spawn_stage(stage, env, ready, log, wrap=self.exec())
        self.procs.append(popen)
        return wait_ready_file(key, popen, ready, log, timeout_s)["address"]

    def popen(
        self, argv: Sequence[str], env: Mapping[str, str], log: str, cwd: Path | None = None
    ) -> subprocess.Popen[str]:
        """Run ``argv`` here, its stdout piped to the caller, its stderr to a log file in the run folder."""
        with open(self.network.run_dir / log, "ab") as stderr:
            proc = subprocess.Popen(
                cwd=cwd,
                args=[*self.exec(), *argv],
                env=dict(env),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.procs.append(proc)
        return proc

    def use_dns(self, server: str) -> None:
        """Resolve names with the DNS server at ``server`` (for processes started here from now on)."""
        etc = NETNS_ETC / self.ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {server}\noptions timeout:1 attempts:2\n")

    def partition(self) -> None:
        partition(self.ns)

    def heal(self) -> None:
        heal(self.ns)

    def loss(self, percent: int) -> None:
        loss(self.ns, percent)


class Network:
    """Namespaces on one bridge. Use as a context manager: everything is removed on exit."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.hosts: list[Host] = []
        self._tag = f"{PREFIX}{os.getpid() % 100000}"
        self._bridge = f"{self._tag}br"

    def __enter__(self) -> Network:
        remove_leftovers()
        _ip("ip", "netns", "add", self._bridge)
        _ip("ip", "link", "add", "br0", "type", "bridge", ns=self._bridge)
        _ip("ip", "link", "set", "br0", "up", ns=self._bridge)
        return self

    def host(self, name: str) -> Host:
        n = len(self.hosts) + 1
        ns, veth = f"{self._tag}{name}", f"v{n}"
        _ip("ip", "netns", "add", ns)
        # One end in the bridge's namespace, the other in the host's: never in the machine's own.
        _ip("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns, ns=self._bridge)
        _ip("ip", "link", "set", veth, "master", "br0", ns=self._bridge)
        _ip("ip", "link", "set", veth, "up", ns=self._bridge)
        _ip("ip", "addr", "add", f"{SUBNET}.{n}/24", "dev", "eth0", ns=ns)
        _ip("ip", "link", "set", "eth0", "up", ns=ns)
        _ip("ip", "link", "set", "lo", "up", ns=ns)
        host = Host(self, name, ns, f"{SUBNET}.{n}")
        self.hosts.append(host)
        return host

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        procs = [p for h in self.hosts for p in h.procs]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in [h.ns for h in self.hosts] + [self._bridge]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


class DnsServer:
    """A real DNS server (dnsmasq) on a host of the network, answering names from a folder of hosts files it
    watches: a record is a file, so adding or removing one changes what the name resolves to, at once."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.records = host.network.run_dir / "dns-records"
        self.records.mkdir(exist_ok=True)
        argv = [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            f"--hostsdir={self.records}",
            f"--listen-address={host.ip}",
            "--bind-interfaces",
            "--local-ttl=0",
            "--user=root",
            "--pid-file=",
        ]
        self.proc = host.popen(argv, os.environ, "dnsmasq.log")

    @property
    def address(self) -> str:
        return self.host.ip

    def add(self, name: str, ip: str) -> None:
        tmp = self.records.parent / f"dns-record-{ip}.tmp"  # outside the watched folder until it is whole
        tmp.write_text(f"{ip} {name}\n")
        tmp.replace(self.records / ip)  # dnsmasq sees a whole file appear

    def remove(self, ip: str) -> None:
        (self.records / ip).unlink(missing_ok=True)
