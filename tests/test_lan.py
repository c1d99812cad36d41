"""The README's LAN walk-through, run over network namespaces: two worker hosts and a laptop.

What is simulated: machines on one Ethernet segment. ``alice``'s host, ``bob``'s host, the
laptop that runs the notebook and an intruder's machine are each a network namespace of their
own (their only interfaces are ``lo`` and an ``eth0`` with a LAN address, 10.77.0.0/24), and the
segment is a Linux bridge in one more namespace, the "switch", with one veth cable to each.
Nothing is added to the root namespace: the test creates every namespace under a name of its own
(``zs-<pid>-...``) and deletes all of them at the end, which removes their cables too.

The walk-through's steps are followed as a user would take them: each host makes its key pair
with ``zmqsyft keys new`` in a directory of its own, the public halves (only those) are copied
between the hosts' directories, the workers are started with ``zmqsyft worker --keys --allow
--admin`` on their LAN addresses inside their namespaces, and a notebook script run inside the
laptop's namespace connects to both with ``sy.connect(worker_key=..., keys=...)`` and sends a
pointer chain, computes with it, moves a tensor from bob to alice and gets everything back. The
intruder, with a key pair of its own that nobody was given (and the workers' public keys, which
are public), gets no answer from either worker: each refuses it during the handshake, as the
workers' refusal counters show. A sniffer on the switch sees every frame of the segment: the
tensor traffic crosses it, between the laptop and the workers and between the workers, and a
marker tensor's bytes never appear in it (CURVE; and a large tensor of them, sealed with AES-GCM
on the workers' bulk sockets), though the same bytes sent in the clear (a UDP datagram, the
sniffer's positive control) are seen.

The hosts share the machine's ``/dev/shm`` in truth, so every process runs with
``ZMQSYFT_SHM_THRESHOLD=0``: tensors go over the network, as between real machines.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from tests.helpers import ROOT, STARTUP, ip, ip_must, read_line, reap

SUBNET = "10.77.0"
HOSTS = {"alice": 2, "bob": 3, "laptop": 10, "intruder": 66}  # name -> last byte of its address
PORT = 5555
MARKER = b"zmqsyft-lan-marker:plaintext-must-never-cross-the-wire!"  # 55 bytes
CLIENT_TIMEOUT = 120.0  # seconds the notebook script may take (it imports torch: 2 slow cores)


def _env() -> dict[str, str]:
    """The environment of every process the test starts: this one's, with this checkout first on
    ``PYTHONPATH`` (``ip netns exec`` passes the environment on) and shared memory off."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["ZMQSYFT_SHM_THRESHOLD"] = "0"
    return env


@dataclass
class Lan:
    """The namespaces of one run: the switch's and each host's (host name -> namespace)."""

    switch: str
    hosts: dict[str, str]

    def address(self, host: str) -> str:
        return f"{SUBNET}.{HOSTS[host]}"

    def run_in(self, host: str, *command: str) -> list[str]:
        """``command`` as run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.hosts[host], *command]


@contextlib.contextmanager
def lan() -> Iterator[Lan]:
    """Make the switch and the hosts (skipping the test where namespaces cannot be made); delete
    every namespace made, whatever happens."""
    if shutil.which("ip") is None:
        pytest.skip("no ip command (iproute2) to make network namespaces with")
    if os.geteuid() != 0:
        pytest.skip("making network namespaces needs root")
    prefix = f"zs-{os.getpid()}"
    made: list[str] = []
    try:
        switch = f"{prefix}-lan"
        added = ip("netns", "add", switch)
        if added.returncode != 0:
            pytest.skip(f"cannot make a network namespace: {added.stderr.strip()}")
        made.append(switch)
        net = Lan(switch, {})
        ip_must("-n", switch, "link", "set", "lo", "up")
        ip_must("-n", switch, "link", "add", "br0", "type", "bridge")
        ip_must("-n", switch, "link", "set", "br0", "up")
        for host in HOSTS:
            ns = net.hosts[host] = f"{prefix}-{host[0]}"
            ip_must("netns", "add", ns)
            made.append(ns)
            port = f"to-{host}"[:15]
            # both ends are made where they live: the port in the switch, eth0 in the host
            ip_must("-n", switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                  "netns", ns)
            ip_must("-n", switch, "link", "set", port, "master", "br0")
            ip_must("-n", switch, "link", "set", port, "up")
            ip_must("-n", ns, "link", "set", "lo", "up")
            ip_must("-n", ns, "addr", "add", f"{net.address(host)}/24", "dev", "eth0")
            ip_must("-n", ns, "link", "set", "eth0", "up")
        yield net
    finally:
        failed = [ns for ns in made if ip("netns", "del", ns).returncode != 0]
        if failed and sys.exc_info()[1] is None:  # else the test's own failure is the news
            pytest.fail(f"could not delete the network namespaces {failed}")


@dataclass
class Running:
    """A process the test started: stdout a pipe (unbuffered), stderr a temporary file, so that
    it can never block on it."""

    proc: subprocess.Popen[bytes]
    _stderr: IO[bytes]

    def stderr(self) -> str:
        """What it wrote on stderr so far (all of it, once it has exited)."""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def first_line(self, what: str) -> str:
        """The first line it prints, within :data:`STARTUP` seconds (else the test fails, with
        what it wrote on stderr)."""
        try:
            return read_line(self.proc, STARTUP)
        except pytest.fail.Exception as exc:
            reap(self.proc)
            pytest.fail(f"{what}: {exc}\nits stderr:\n{self.stderr()}")


@contextlib.contextmanager
def started(command: list[str], stdin: int = subprocess.DEVNULL) -> Iterator[Running]:
    """``command`` running; killed if still running, and reaped, on leaving the block."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, cwd=ROOT, env=_env(), stdin=stdin,
                                stdout=subprocess.PIPE, stderr=err, bufsize=0)
        try:
            yield Running(proc, err)
        finally:
            reap(proc)


def keys_new(net: Lan, host: str, name: str, directory: Path) -> None:
    """``zmqsyft keys new NAME --dir DIR``, typed on ``host``."""
    done = subprocess.run(net.run_in(host, sys.executable, "-m", "zmqsyft", "keys", "new", name,
                                     "--dir", str(directory)),
                          capture_output=True, text=True, timeout=STARTUP, cwd=ROOT, env=_env(),
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert (directory / f"{name}.key").is_file() and (directory / f"{name}.key_secret").is_file()


def copy_public(source: Path, *folders: Path) -> None:
    """``scp NAME.key host:folder/`` for each folder: the public half only."""
    assert source.suffix == ".key"
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, folder / source.name)


SNIFFER = r"""
import json, os, select, socket, struct, sys

marker = bytes.fromhex(sys.argv[1])
port = int(sys.argv[2])
workers = {socket.inet_aton(a) for a in sys.argv[3:5]}
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # every frame
sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: room to drop nothing
seen = {"frames": 0, "dropped": 0, "worker_tcp_bytes": 0, "peer_tcp_bytes": 0, "marker_in_tcp": 0,
        "marker_in_udp": 0, "marker_elsewhere": 0, "bulk_tcp_bytes": 0}

def account(frame):
    seen["frames"] += 1
    hit = marker in frame
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        seen["marker_elsewhere"] += hit
        return
    ihl = (frame[14] & 0x0F) * 4
    proto = frame[23]
    l4 = frame[14 + ihl:]
    if proto == 6 and len(l4) >= 20:
        sport, dport = struct.unpack("!HH", l4[:4])
        payload = len(l4) - (l4[12] >> 4) * 4
        if port in (sport, dport):
            seen["worker_tcp_bytes"] += payload
            if {frame[26:30], frame[30:34]} == workers:  # alice <-> bob
                seen["peer_tcp_bytes"] += payload
        else:  # the workers' bulk sockets: large messages, sealed
            seen["bulk_tcp_bytes"] += payload
        seen["marker_in_tcp"] += hit
    elif proto in (17, 1):  # the control datagram, and the ICMP "port unreachable" quoting it
        seen["marker_in_udp"] += hit
    else:
        seen["marker_elsewhere"] += hit

print("sniffing", flush=True)
while True:
    ready, _, _ = select.select([sock, 0], [], [])
    if sock in ready:
        account(sock.recv(262144))
    if 0 in ready and not os.read(0, 4096):  # stdin closed: the test is done, drain and report
        sock.setblocking(False)
        while True:
            try:
                account(sock.recv(262144))
            except BlockingIOError:
                break
        break
# PACKET_STATISTICS (SOL_PACKET 263, 6): frames this socket received, and dropped
seen["dropped"] = struct.unpack("II", sock.getsockopt(263, 6, 8))[1]
print(json.dumps(seen), flush=True)
"""

NOTEBOOK = r"""
import json, socket, sys
import torch
import zmqsyft as sy

alice_at, bob_at, alice_key, bob_key, me, marker_hex, plain_to = sys.argv[1:8]
marker = bytes.fromhex(marker_hex)
hook = sy.TorchHook(torch)
out = {}
alice = sy.connect(alice_at, worker_key=alice_key, keys=me, timeout=30)
bob = sy.connect(bob_at, worker_key=bob_key, keys=me, timeout=30)
out["ids"] = [alice.id, bob.id]

x = torch.tensor([1, 2, 3, 4]).send(bob).send(alice)   # alice owns bob's object now
out["chain"] = (x + x).get().get().tolist()
moved = torch.ones(3).send(bob).move(alice)            # bob -> alice directly
out["moved_to"] = moved.location.id
out["moved"] = moved.get().tolist()

secret = torch.frombuffer(bytearray(marker), dtype=torch.uint8)
back = secret.send(bob).move(alice).get()              # laptop -> bob -> alice -> laptop
out["marker_back"] = bytes(back.tolist()) == marker
# a large one (2.2 MB) goes sealed beside the CURVE connections, on every hop
big = torch.frombuffer(bytearray(marker * 40000), dtype=torch.uint8)
out["big_back"] = torch.equal(big.send(bob).move(alice).get(), big)
out["sealed_in"] = [w.stats()["counters"].get("sealed_messages_in", 0) for w in (alice, bob)]
# the sniffer's positive control: the same bytes in the clear, through the same switch
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
    udp.sendto(marker, (plain_to, 9))

# bob knows alice by the name of her key file in its --allow directory, and saw her relay
out["bob_peers"] = sorted(bob.stats()["peers"])
out["left"] = [len(alice._objects), len(bob._objects)]  # x's two hops; the rest was taken
out["refused"] = [w.stats()["counters"]["connections_refused"] for w in (alice, bob)]
print("RESULT " + json.dumps(out), flush=True)
"""

INTRUDER = r"""
import json, sys
import zmqsyft as sy

alice_at, bob_at, alice_key, bob_key, mine = sys.argv[1:6]
out = {}
for name, at, key in (("alice", alice_at, alice_key), ("bob", bob_at, bob_key)):
    try:
        sy.connect(at, worker_key=key, keys=mine, timeout=10)
        out[name] = "answered"
    except (sy.LimitExceeded, sy.WorkerUnavailable) as exc:
        out[name] = type(exc).__name__
print("RESULT " + json.dumps(out), flush=True)
"""


@contextlib.contextmanager
def worker(net: Lan, host: str, name: str, home: Path) -> Iterator[str]:
    """``zmqsyft worker --id NAME --bind tcp://<host's LAN address>:PORT --keys --allow
    --admin`` started on ``host``; yields the line it printed once listening."""
    command = net.run_in(host, sys.executable, "-m", "zmqsyft", "worker", "--id", name,
                         "--bind", f"tcp://{net.address(host)}:{PORT}", "--keys",
                         str(home / "keys"), "--allow", str(home / "allow"), "--admin",
                         str(home / "allow" / "notebook.key"))
    with started(command) as running:
        yield running.first_line(f"worker {name}")


def run_python(net: Lan, host: str, code: str, *args: str) -> dict[str, Any]:
    """``python -c CODE ARGS`` run to its end on ``host`` (killed after :data:`CLIENT_TIMEOUT`
    seconds: ``subprocess.TimeoutExpired``); what it printed on its ``RESULT <json>`` line."""
    done = subprocess.run(net.run_in(host, sys.executable, "-c", code, *args), capture_output=True,
                          text=True, timeout=CLIENT_TIMEOUT, cwd=ROOT, env=_env(),
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{host}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    found = re.search(r"^RESULT (.*)$", done.stdout, re.MULTILINE)
    assert found, f"{host} printed no result:\n{done.stdout}\n{done.stderr}"
    result = json.loads(found.group(1))
    assert isinstance(result, dict)
    return result


@pytest.mark.timeout(180)
def test_the_lan_walk_through_over_network_namespaces(tmp_path: Path) -> None:
    with lan() as net, contextlib.ExitStack() as stack:
        home = {host: tmp_path / host for host in HOSTS}
        for folder in home.values():
            folder.mkdir(mode=0o700)
        at = {name: f"tcp://{net.address(name)}:{PORT}" for name in ("alice", "bob")}

        # 1. a key pair on each machine
        keys_new(net, "alice", "alice", home["alice"] / "keys")
        keys_new(net, "bob", "bob", home["bob"] / "keys")
        keys_new(net, "laptop", "notebook", home["laptop"] / "keys")
        keys_new(net, "intruder", "intruder", home["intruder"] / "keys")  # given to nobody

        # 2. the public halves to where they must be recognised (the intruder gets the
        # workers' public keys too: they are no secret)
        copy_public(home["laptop"] / "keys" / "notebook.key",
                    home["alice"] / "allow", home["bob"] / "allow")
        copy_public(home["alice"] / "keys" / "alice.key",
                    home["bob"] / "allow", home["laptop"], home["intruder"])
        copy_public(home["bob"] / "keys" / "bob.key",
                    home["alice"] / "allow", home["laptop"], home["intruder"])
        for host in HOSTS:
            secrets = sorted(p.name for p in home[host].rglob("*_secret"))
            assert secrets == [f"{host if host != 'laptop' else 'notebook'}.key_secret"], secrets

        # 3. the workers, on their LAN addresses, CURVE on
        for name in ("alice", "bob"):
            line = stack.enter_context(worker(net, name, name, home[name]))
            match = re.fullmatch(rf"zmqsyft worker '{name}' listening on (\S+) with key "
                                 r"(\S{40}); (\d+) client keys allowed; large messages sealed "
                                 r"on (\S+)", line)
            assert match, line
            assert match.group(1) == at[name]
            assert match.group(4).startswith(at[name].rsplit(":", 1)[0] + ":"), line
            public = (home[name] / "keys" / f"{name}.key").read_text()
            assert f'"{match.group(2)}"' in public, "the worker does not use its --keys pair"
            assert match.group(3) == "2", line  # the notebook's and the other worker's

        # a sniffer on the switch, seeing every frame of the segment
        sniffer = stack.enter_context(started(
            ["ip", "netns", "exec", net.switch, sys.executable, "-c", SNIFFER, MARKER.hex(),
             str(PORT), net.address("alice"), net.address("bob")], stdin=subprocess.PIPE))
        assert sniffer.first_line("the sniffer") == "sniffing"

        # an intruder's key is refused by both workers
        intruder = run_python(net, "intruder", INTRUDER, at["alice"], at["bob"],
                              str(home["intruder"] / "alice.key"),
                              str(home["intruder"] / "bob.key"),
                              str(home["intruder"] / "keys" / "intruder.key_secret"))

        # 4. the notebook, on the laptop
        out = run_python(net, "laptop", NOTEBOOK, at["alice"], at["bob"],
                         str(home["laptop"] / "alice.key"), str(home["laptop"] / "bob.key"),
                         str(home["laptop"] / "keys" / "notebook"), MARKER.hex(),
                         net.address("alice"))

        sniffed, _ = sniffer.proc.communicate(timeout=30)  # closing its stdin stops it
        assert sniffer.proc.returncode == 0, sniffer.stderr()
        seen = json.loads(sniffed.decode().strip().splitlines()[-1])

    assert out["ids"] == ["alice", "bob"]
    assert out["chain"] == [2, 4, 6, 8]
    assert out["moved_to"] == "alice" and out["moved"] == [1.0, 1.0, 1.0]
    assert out["marker_back"] is True
    assert out["big_back"] is True
    assert out["sealed_in"] == [1, 1], out["sealed_in"]  # bob's PUT to alice; ours to bob
    assert out["bob_peers"] == ["alice", "notebook"], out["bob_peers"]
    assert out["left"] == [1, 1], out["left"]
    assert intruder["alice"] in ("LimitExceeded", "WorkerUnavailable"), intruder
    assert intruder["bob"] in ("LimitExceeded", "WorkerUnavailable"), intruder
    assert all(n >= 1 for n in out["refused"]), out["refused"]  # the workers refused it
    # the tensors crossed the switch, encrypted: the sniffer saw the marker only in the clear
    assert seen["peer_tcp_bytes"] > 2 * len(MARKER), seen  # bob -> alice went over the LAN
    assert seen["worker_tcp_bytes"] > seen["peer_tcp_bytes"], seen
    assert seen["marker_in_udp"] >= 1 and seen["dropped"] == 0, f"the sniffer missed frames: {seen}"
    assert seen["bulk_tcp_bytes"] > 3 * len(MARKER) * 40000, seen  # in, on, and back out
    assert seen["marker_in_tcp"] == 0 and seen["marker_elsewhere"] == 0, seen
