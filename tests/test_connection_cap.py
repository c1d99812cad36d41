"""``Config.max_connections``: a worker serves at most that many connections at once.

One more is refused during its ZeroMQ handshake (the worker's ZAP gate answers 400): the raw
DEALER's monitor shows ``HANDSHAKE_FAILED_AUTH`` and nothing it sends is answered, a zmqsyft
client gets ``LimitExceeded`` within a second or so instead of waiting for its request timeout,
and the connections already served go on being served. A refused connection is closed by the
worker at once, so a flood of them costs the worker no descriptors.

Everything runs on real worker processes and real sockets (ipc and tcp on 127.0.0.1); every wait
has a deadline and nothing synchronises with ``time.sleep``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

import zmqsyft as sy
from tests.helpers import alive_check, assert_answers_ping, cli_worker, next_reply, raw_dealer
from zmqsyft import WorkerClient
from zmqsyft.wire.codec import encode_message
from zmqsyft.wire.messages import Op

CAP = 4  # the spawning client's own connection is one of them
_WATCHED = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


@dataclass
class Dealer:
    """A bare DEALER to a worker and a monitor of its handshake."""

    sock: zmq.Socket
    monitor: zmq.Socket
    status: int | None = None  # the ZAP status code of a refused handshake

    def handshake(self, timeout: float = 10.0) -> int:
        """Wait for the handshake's outcome: the monitor event that ended it."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"the handshake had no outcome within {timeout}s")
            if self.monitor.poll(remaining * 1000):
                event = recv_monitor_message(self.monitor)
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    self.status = event["value"]
                return event["event"]

    def ping(self, req_id: int, alive: Callable[[], bool]) -> None:
        """A PING on this connection is answered."""
        self.sock.send_multipart(encode_message(Op.PING, req_id, {}))
        reply = next_reply(self.sock, alive=alive)
        assert (reply.op, reply.req_id) == (Op.REPLY, req_id), reply

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


@contextmanager
def dealers() -> Iterator[Callable[[Any], Dealer]]:
    """A factory of bare DEALERs (in a context of their own), all closed on leaving."""
    ctx = zmq.Context()
    ctx.setsockopt(zmq.MAX_SOCKETS, 4096)
    made: list[Dealer] = []

    def make(worker: Any) -> Dealer:
        """A DEALER to ``worker`` (a handle or a CLI worker), as the client it knows."""
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        keys = getattr(worker, "client_keys", None) or sy.get_session().keys
        sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret
        sock.curve_serverkey = worker.key.encode()
        monitor = sock.get_monitor_socket(_WATCHED)
        sock.connect(worker.address)
        made.append(Dealer(sock, monitor))
        return made[-1]

    try:
        yield make
    finally:
        for dealer in made:
            if not dealer.sock.closed:
                dealer.close()
        ctx.term()


def served(make: Callable[[Any], Dealer], worker: WorkerClient, n: int) -> list[Dealer]:
    """``n`` more connections to ``worker``, each with a PING answered."""
    alive = alive_check(worker)
    out = []
    for k in range(n):
        dealer = make(worker)
        assert dealer.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED, f"connection {k} was refused"
        dealer.ping(k + 1, alive)
        out.append(dealer)
    return out


def assert_refused(dealer: Dealer) -> None:
    event = dealer.handshake()
    assert event == zmq.EVENT_HANDSHAKE_FAILED_AUTH, f"handshake ended with event {event}"
    assert dealer.status == 400


def served_after_retries(make: Callable[[Any], Dealer], worker: WorkerClient,
                         timeout: float = 20.0) -> Dealer:
    """A new connection that is served, retried (each attempt refused and closed) until the
    worker has noticed that a slot came free; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        dealer = make(worker)
        if dealer.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            dealer.ping(99, alive_check(worker))
            return dealer
        dealer.close()
        if time.monotonic() > deadline:
            pytest.fail(f"no new connection was served within {timeout}s of one closing")


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(120)
def test_n_connections_are_served_and_the_next_is_refused(spawn: Callable[..., WorkerClient]) -> None:
    worker = spawn("capped", config=sy.Config(max_connections=CAP))
    alive = alive_check(worker)
    assert_answers_ping(worker)  # this client's own connection: one of the CAP
    with dealers() as make:
        ok = served(make, worker, CAP - 1)
        extra = make(worker)
        assert_refused(extra)
        try:
            extra.sock.send_multipart(encode_message(Op.PING, 1, {}), zmq.NOBLOCK)
        except zmq.Again:
            pass  # its connection is gone: nothing to send on
        for k, dealer in enumerate(ok):  # the served ones still are
            dealer.ping(10 + k, alive)
        assert_answers_ping(worker)
        assert not extra.sock.poll(500), "the refused connection got an answer"
        assert worker.stats()["counters"]["connections_refused"] == 1
        deadline = time.monotonic() + 10.0  # the refused one is closed, as the gate will see
        while (counted := worker.stats()["counters"]["connections_open"]) != CAP:
            assert counted == CAP + 1 and time.monotonic() < deadline, counted
        ok.pop(0).close()
        again = served_after_retries(make, worker)
        for k, dealer in enumerate(ok):
            dealer.ping(20 + k, alive)
        again.ping(30, alive)
        assert_refused(make(worker))  # full again


@pytest.mark.timeout(120)
def test_connect_beyond_the_cap_raises_limit_exceeded_promptly(spawn: Callable[..., WorkerClient]) -> None:
    worker = spawn("capped", config=sy.Config(max_connections=2))
    address = worker.address  # ready, and no connection of this client's yet
    with dealers() as make:
        ok = served(make, worker, 2)
        start = time.monotonic()
        with pytest.raises(sy.LimitExceeded) as info:
            sy.connect(address)
        took = time.monotonic() - start
        assert took < 5.0 < sy.get_config().timeout, f"refused after {took:.1f}s"
        message = str(info.value)
        assert "refused the connection during the handshake" in message
        assert "max_connections" in message and address in message
        assert "ZMQSYFT_MAX_CONNECTIONS" in message and "--max-connections" in message
        assert isinstance(info.value, sy.SecurityError)
        with pytest.raises(sy.LimitExceeded, match="max_connections"):  # the spawned handle too
            worker.ping()
        ok.pop().close()
        deadline = time.monotonic() + 20.0
        while True:  # served once the worker has noticed the closed connection
            try:
                assert_answers_ping(worker)
                break
            except sy.LimitExceeded:
                if time.monotonic() > deadline:
                    raise
        assert sy.connect(address) is worker


@pytest.mark.timeout(300)
def test_a_flood_beyond_the_cap_costs_the_worker_no_descriptors(spawn: Callable[..., WorkerClient]) -> None:
    worker = spawn("capped", config=sy.Config(max_connections=CAP))
    alive = alive_check(worker)
    assert_answers_ping(worker)
    assert worker._proc is not None
    pid = worker._proc.pid
    wave, waves, slack = 30, 10, 10
    with dealers() as make:
        ok = served(make, worker, CAP - 1)
        base = descriptors(pid)
        peak = base
        refused: list[Dealer] = []
        for _ in range(waves):  # 300 attempts, all kept open on this side
            attempts = [make(worker) for _ in range(wave)]
            for dealer in attempts:
                assert_refused(dealer)
            peak = max(peak, descriptors(pid))
            refused += attempts
        deadline = time.monotonic() + 20.0
        while (settled := descriptors(pid)) > base + slack and time.monotonic() < deadline:
            ok[0].ping(7, alive)  # a round trip: the worker has moved on meanwhile
        print(f"\nworker descriptors: {base} with {CAP} connections, peak {peak} during "
              f"{len(refused)} refused attempts held open, {settled} after")
        assert settled <= base + slack, (base, peak, settled)
        assert peak <= base + wave + slack, (base, peak, settled)
        for k, dealer in enumerate(ok):  # the legitimate connections are still served
            dealer.ping(100 + k, alive)
        assert_answers_ping(worker)


@pytest.mark.timeout(120)
def test_the_default_cap_does_not_disturb_many_connections(spawn: Callable[..., WorkerClient]) -> None:
    worker = spawn("uncapped")
    assert sy.Config().max_connections == 1024
    assert_answers_ping(worker)
    with dealers() as make:
        ok = served(make, worker, 64)
        for k, dealer in enumerate(ok):
            dealer.ping(200 + k, alive_check(worker))


@pytest.mark.timeout(120)
def test_a_worker_refused_by_a_full_peer_reports_limit_exceeded(spawn: Callable[..., WorkerClient],
                                                                hook: sy.TorchHook) -> None:
    alice = spawn("alice", config=sy.Config(max_connections=2))
    bob = spawn("bob")
    assert_answers_ping(alice)  # this client's connection: 1 of 2
    with dealers() as make:
        served(make, alice, 1)  # 2 of 2: bob's link to alice is one too many
        x = torch.arange(4.0).send(bob)
        start = time.monotonic()
        with pytest.raises(sy.LimitExceeded) as info:
            x.move(alice)
        assert time.monotonic() - start < 5.0
        message = str(info.value)
        assert "refused the connection during the handshake" in message
        assert "max_connections" in message and alice.address in message
        assert torch.equal(x.get(), torch.arange(4.0))  # it stayed on bob, who serves on


@pytest.mark.timeout(60)
def test_a_connection_that_never_handshakes_is_closed_after_ten_seconds() -> None:
    """A bare TCP connect that sends nothing holds a place under the cap: the worker closes it
    after its 10 s handshake interval (libzmq's default would keep it 30 s)."""
    with cli_worker("--id", "bob") as worker:  # tcp://127.0.0.1, a free port
        host, port = worker.endpoint[len("tcp://"):].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as raw:
            started = time.monotonic()
            while raw.recv(4096):  # the worker's ZMTP greeting, then end of file once closed
                pass
            took = time.monotonic() - started
        assert took < 20, f"the worker kept a silent connection {took:.1f}s"
        with raw_dealer(worker) as caller:
            caller.send_multipart(encode_message(Op.PING, 1, {}))
            assert next_reply(caller).op is Op.REPLY


@pytest.mark.timeout(60)
def test_sending_on_a_connection_refused_meanwhile_fails_at_once(spawn: Callable[..., WorkerClient]) -> None:
    """A connection whose handshake the worker refused has no peer left to queue a message for
    (libzmq does not retry it): a send there must fail at once, saying why, never block for
    ever (a worker's close() at a test's teardown used to hang there)."""
    from zmqsyft.wire.bodies import Ping
    worker = spawn("capped", config=sy.Config(max_connections=1))
    address = worker.address
    with dealers() as make:
        served(make, worker, 1)  # the one place taken
        conn = worker.session.conn(worker)
        conn._socket()  # connects, HELLO queued, nothing waited for
        deadline = time.monotonic() + 10.0
        while conn.watch.refused is None:  # the handshake's refusal, as the monitor reports it
            assert time.monotonic() < deadline, "the connection was not refused"
            conn.watch.monitor.poll(100)
            conn.watch.down()
        start = time.monotonic()  # (over ipc the send itself fails; over tcp libzmq queues it
        with pytest.raises(sy.LimitExceeded, match="max_connections") as info:  # for a retry)
            conn.wait(conn.send(Op.PING, Ping()), timeout=30)
        assert time.monotonic() - start < 5.0
        assert address in str(info.value)


@pytest.mark.timeout(120)
def test_a_refusal_before_the_first_send_on_a_peer_link_is_limit_exceeded(
        spawn: Callable[..., WorkerClient], monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer can refuse a link's handshake before the link's first message leaves (a loaded
    machine: the handshake is done between ``connect`` and the HELLO); libzmq then has dropped
    the connection and a send finds nothing to queue on. The request fails with the refusal,
    not with ZeroMQ's ``Again``, and the link is dropped."""
    from zmqsyft.wire.bodies import Ping
    from zmqsyft.worker.peers import PeerLink, PeerLinks
    from zmqsyft.worker.traffic import Traffic

    alice = spawn("alice", config=sy.Config(max_connections=1))
    assert_answers_ping(alice)  # this client's connection fills it
    hello = PeerLink.hello

    def refused_first(link: PeerLink, *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + 10.0
        # until the handshake was refused and libzmq dropped the connection (nothing to send on)
        while link.watch.down() is None or link.sock.poll(0, zmq.POLLOUT):
            assert time.monotonic() < deadline, "the handshake was not refused"
            link.watch.monitor.poll(20)
        return hello(link, *args, **kwargs)

    monkeypatch.setattr(PeerLink, "hello", refused_first)
    ctx = zmq.Context()
    links = PeerLinks("tester", sy.get_config(), ctx, zmq.Poller(), Traffic(),
                      keys=sy.get_session().keys)
    links.keys_at[alice.address] = alice.key
    outcome: list[Any] = []
    try:
        links.request(alice.address, Op.PING, Ping(), lambda reply, exc: outcome.append(exc))
        assert len(outcome) == 1 and isinstance(outcome[0], sy.LimitExceeded), outcome
        assert "refused the connection during the handshake" in str(outcome[0])
        assert alice.address not in links.links
    finally:
        links.close()
        ctx.term()
