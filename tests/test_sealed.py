"""Large messages sealed beside the CURVE connection (zmqsyft.wire.bulk, zmqsyft.worker.sealed).

The channel's own rules first, with the real cipher (no sockets needed to check them): what
goes in comes out, and nothing forged, replayed, reordered, cut short or over the receiver's
limits is accepted. Then on real workers: large tensors really take the sealed road both ways
and arrive intact; an attacker on the bulk port, without the channel's key or even its ticket,
gets nowhere and costs the worker nothing; a marker whose data never comes is answered with an
error in time and the connection's later requests are still served, in order.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import replace

import pytest
import torch
import zmq
import zmq.utils.z85

import zmqsyft as sy
from tests.helpers import alive_check, cli_worker, expect_error, next_reply, raw_dealer, run_cli
from zmqsyft.client import get_session
from zmqsyft.errors import RequestTimeout
from zmqsyft.wire import bulk, transport
from zmqsyft.wire.bodies import Bulk, Get, GetReply, Hello, HelloReply, Ping, Put
from zmqsyft.wire.channel import bulk_address
from zmqsyft.wire.codec import decode_message, encode_message
from zmqsyft.wire.messages import Op

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def _pair(**limits: int) -> tuple[bulk.Sealer, bulk.Opener]:
    secret = bulk.new_secret()
    caller, worker = bulk.ChannelKeys(secret, caller=True), bulk.ChannelKeys(secret, caller=False)
    assert caller.channel == worker.channel and caller.send_key == worker.recv_key
    assert caller.send_key != caller.recv_key  # one key per direction
    return (bulk.Sealer(caller.channel, caller.send_key),
            bulk.Opener(worker.channel, worker.recv_key, **limits))


def _frames() -> list[bytes]:
    return [b"header", b"", secrets.token_bytes(bulk.CHUNK), secrets.token_bytes(bulk.CHUNK + 1),
            secrets.token_bytes(3 * bulk.CHUNK + bulk.CHUNK // 2), b"x"]


def _open_all(opener: bulk.Opener, chunks: list) -> list[int]:
    return [b for b in (opener.open(c) for c in chunks) if b]


# ------------------------------------------------------------------ the channel's rules
def test_frames_of_every_size_come_out_as_they_went_in() -> None:
    sealer, opener = _pair()
    frames = _frames()
    chunks = list(sealer.seal(1, frames))
    assert len(chunks) == 1 + 1 + 1 + 2 + 4 + 1
    assert _open_all(opener, chunks) == [1]
    got = opener.take(1)
    assert got is not None and [bytes(memoryview(f)) for f in got] == frames
    assert type(got[0]) is bytes and opener.pending == 0
    assert opener.take(1) is None  # taken once


def test_the_ciphertext_does_not_hold_the_plaintext() -> None:
    sealer, _ = _pair()
    secret_data = b"the patients' records " * 1000
    sealed = b"".join(bytes(c) for c in sealer.seal(1, [b"h", secret_data]))
    assert b"patients" not in sealed


def test_a_plain_channel_carries_frames_and_a_sealed_one_refuses_its_chunks() -> None:
    """An insecure worker's channel (plain) carries frames unencrypted; an opener of a CURVE
    worker's channel (AES-GCM) never takes a plain chunk, even with the right channel id."""
    secret = bulk.new_secret()
    caller, worker = bulk.ChannelKeys(secret, caller=True), bulk.ChannelKeys(secret, caller=False)
    plain = bulk.Sealer(caller.channel, caller.send_key, plain=True)
    frames = _frames()
    chunks = list(plain.seal(1, frames))
    assert frames[2] in b"".join(bytes(c) for c in chunks)  # (not encrypted)
    opener = bulk.Opener(worker.channel, worker.recv_key, plain=True)
    assert _open_all(opener, chunks) == [1]
    got = opener.take(1)
    assert got is not None and [bytes(memoryview(f)) for f in got] == frames
    sealed_opener = bulk.Opener(worker.channel, worker.recv_key)
    with pytest.raises(bulk.BulkError, match="does not authenticate"):
        sealed_opener.open(chunks[0])


def test_an_insecure_workers_large_messages_go_beside_the_connection(
        hook: sy.TorchHook) -> None:
    """No CURVE, but large tensors still take the bulk socket (plain), both ways and on a
    peer link, so that a slow link carrying them never holds up the heartbeats (see
    tests/test_netns_links.py)."""
    cfg = replace(get_session().cfg, shm_threshold=0, insecure=True)
    with _no_shm():
        sy.configure(insecure=True)
        try:
            bob = sy.spawn_worker("bob", transport_kind="tcp", config=cfg)
            alice = sy.spawn_worker("alice", transport_kind="tcp", config=cfg)
            try:
                x = torch.randn(3 * MiB)
                p = x.send(bob)
                assert torch.equal((p * 2).get(), x * 2)
                assert torch.equal(p.move(alice).get(), x)
                bob_counts, alice_counts = _counters(bob), _counters(alice)
                assert bob_counts["sealed_messages_in"] == 1, bob_counts
                assert bob_counts["sealed_messages_out"] == 1, bob_counts  # (the product)
                assert alice_counts["sealed_messages_in"] == 1, alice_counts  # (the move)
            finally:
                bob.close()
                alice.close()
        finally:
            sy.configure(insecure=False)


def test_a_replayed_or_reordered_chunk_is_refused() -> None:
    sealer, opener = _pair()
    chunks = list(sealer.seal(1, [b"h", secrets.token_bytes(3 * bulk.CHUNK)]))
    opener.open(chunks[0])
    opener.open(chunks[1])
    with pytest.raises(bulk.BulkError, match="replayed or out of order"):
        opener.open(chunks[1])  # the same again
    with pytest.raises(bulk.BulkError, match="replayed or out of order"):
        opener.open(chunks[0])
    with pytest.raises(bulk.BulkError, match="out of sequence"):
        opener.open(chunks[3])  # one skipped
    assert _open_all(opener, chunks[2:]) == [1]  # the real sequence still completes it
    # a whole blob replayed later: its counters are spent
    with pytest.raises(bulk.BulkError, match="replayed"):
        opener.open(chunks[0])


def test_a_forged_chunk_is_refused_and_leaves_the_blob_in_progress_alone() -> None:
    sealer, opener = _pair()
    frames = [b"h", secrets.token_bytes(2 * bulk.CHUNK)]
    chunks = [bytearray(c) for c in sealer.seal(7, frames)]
    opener.open(chunks[0])
    opener.open(chunks[1])
    # who saw the channel id go by can write a header, not a tag that checks
    forged = bytearray(chunks[2])
    forged[bulk.HEADER + 5] ^= 1
    with pytest.raises(bulk.BulkError, match="does not authenticate"):
        opener.open(forged)
    # a header changed (the offset, the blob id) breaks the tag too: it is authenticated data
    moved = bytearray(chunks[2])
    moved[24] ^= 1  # the blob id
    with pytest.raises(bulk.BulkError):
        opener.open(moved)
    assert opener.open(chunks[2]) == 7
    got = opener.take(7)
    assert got is not None and bytes(memoryview(got[1])) == frames[1]


def test_another_channels_key_opens_nothing() -> None:
    sealer, _ = _pair()
    _, other = _pair()
    chunk = next(sealer.seal(1, [b"h"]))
    with pytest.raises(bulk.BulkError, match="another channel"):
        other.open(chunk)
    # the same channel id but another key (a guess): the tag does not check
    wrong = bulk.Opener(sealer.channel, secrets.token_bytes(32))
    with pytest.raises(bulk.BulkError, match="does not authenticate"):
        wrong.open(chunk)


@pytest.mark.parametrize(("limits", "frames", "why"), [
    ({"max_bytes": 2 * MiB}, [b"h", bytes(MiB), bytes(MiB + 1)], "max_message_size"),
    ({"max_frames": 2}, [b"h", b"a", b"b"], "max_frames"),
    ({"max_pending": MiB}, [b"h", bytes(MiB + 1)], "still waiting"),
])
def test_a_blob_over_the_receivers_limits_is_refused_and_its_marker_told_why(
        limits: dict, frames: list[bytes], why: str) -> None:
    sealer, opener = _pair(**limits)
    with pytest.raises(bulk.BulkError):
        _open_all(opener, list(sealer.seal(1, frames)))
    assert opener.pending == 0
    with pytest.raises(bulk.BulkError, match=why):
        opener.take(1)
    # the next blob is accepted as usual
    assert _open_all(opener, list(sealer.seal(2, [b"h", b"small"]))) == [2]


def test_a_blob_cut_short_is_dropped_when_the_next_one_starts() -> None:
    sealer, opener = _pair()
    first = list(sealer.seal(1, [b"h", bytes(3 * bulk.CHUNK)]))
    second = list(sealer.seal(2, [b"h2", b"data"]))
    _open_all(opener, first[:2])  # the rest lost with a broken connection
    assert _open_all(opener, second) == [2]
    with pytest.raises(bulk.BulkError, match="broke off"):
        opener.take(1)
    assert opener.pending == len(b"h2data")  # the first one's buffers were let go
    assert opener.take(2) is not None and opener.pending == 0


def test_blobs_nobody_claims_are_given_up() -> None:
    sealer, opener = _pair()
    _open_all(opener, list(sealer.seal(1, [b"h", bytes(MiB)])))
    _open_all(opener, list(sealer.seal(2, [b"h", bytes(MiB)]))[:1])
    assert opener.pending > MiB
    assert opener.expire(time.monotonic() + 1) == 2
    assert opener.pending == 0 and opener.take(1) is None


# ------------------------------------------------------------------ on real workers
@pytest.fixture
def tcp_bob(hook: sy.TorchHook) -> sy.WorkerClient:
    """A tcp worker with shared memory off on both ends: large tensors cross the sockets."""
    cfg = replace(get_session().cfg, shm_threshold=0)
    w = sy.spawn_worker("bob", transport_kind="tcp", config=cfg)
    try:
        with _no_shm():
            yield w
    finally:
        w.close()


class _no_shm:
    def __enter__(self) -> None:
        self.before = get_session().cfg.shm_threshold
        sy.configure(shm_threshold=0)

    def __exit__(self, *exc: object) -> None:
        sy.configure(shm_threshold=self.before)


def _counters(w: sy.WorkerClient) -> dict[str, int]:
    return w.stats()["counters"]


def test_large_tensors_go_sealed_both_ways_and_arrive_intact(tcp_bob: sy.WorkerClient) -> None:
    x = torch.randn(3 * MiB)  # 12 MiB: 13 chunks
    small = torch.arange(10.0)  # under the threshold: inside the CURVE connection
    p, q = x.send(tcp_bob), small.send(tcp_bob)
    assert _counters(tcp_bob)["sealed_messages_in"] == 1
    r = p * 2  # computed there, fetched sealed
    assert torch.equal(r.get(), x * 2)
    assert torch.equal(p.get(), x)
    assert torch.equal(q.get(), small)
    counters = _counters(tcp_bob)
    assert counters["sealed_messages_in"] == 1 and counters["sealed_messages_out"] == 2
    assert counters.get("bulk_dropped", 0) == 0


def test_sealing_can_be_turned_off(hook: sy.TorchHook) -> None:
    cfg = replace(get_session().cfg, shm_threshold=0, sealed_threshold=0)
    w = sy.spawn_worker("bob", transport_kind="tcp", config=cfg)
    try:
        with _no_shm():
            sy.configure(sealed_threshold=0)
            try:
                x = torch.randn(2 * MiB)
                assert torch.equal(x.send(w).get(), x)
                assert "sealed_messages_in" not in _counters(w)
            finally:
                sy.configure(sealed_threshold=1 << 20)
    finally:
        w.close()


def test_a_stranger_cannot_connect_to_the_bulk_port(tcp_bob: sy.WorkerClient) -> None:
    """No channel's ticket, no connection: refused in the handshake (and so it holds no
    descriptor); a wrong ticket likewise."""
    x = torch.randn(2 * MiB)
    p = x.send(tcp_bob)  # (a channel exists: its ticket is not ours)
    hello = _hello_reply(tcp_bob)
    address = bulk_address(tcp_bob.address, hello.bulk)
    ctx = zmq.Context()
    try:
        for user, password in ((None, None), (b"00" * 16, b"11" * 16)):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if user is not None:
                sock.plain_username, sock.plain_password = user, password
            watch = transport.PeerWatch(sock, 5.0)
            sock.connect(address)
            deadline = time.monotonic() + 10
            while watch.down() is None and time.monotonic() < deadline:
                watch.monitor.poll(100)
            why = watch.down()
            watch.close(sock)
            sock.close(linger=0)
            assert why is not None and (watch.refused is not None or watch.failed), why
    finally:
        ctx.term()
    assert torch.equal(p.get(), x)


def test_forged_chunks_with_a_sniffed_ticket_are_dropped_and_cost_nothing(
        tcp_bob: sy.WorkerClient) -> None:
    """A sniffer on the wire sees a channel's id and ticket (PLAIN credentials go in clear): it
    can connect, and write chunks with that channel id, but without the key none is accepted;
    the victim's transfers go on untouched."""
    x = torch.randn(2 * MiB)
    p = x.send(tcp_bob)
    conn = tcp_bob.session.conn(tcp_bob)
    assert conn._bulk is not None
    keys = conn._bulk.keys
    address = bulk_address(tcp_bob.address, conn.peer.bulk)
    before = _counters(tcp_bob).get("bulk_dropped", 0)
    ctx = zmq.Context()
    sock = transport.make_bulk_dealer(ctx, address, tcp_bob.session.cfg, keys.user, keys.ticket,
                                      bulk.MAX_CHUNK_MESSAGE)
    try:
        forger = bulk.Sealer(keys.channel, secrets.token_bytes(32))  # the id, not the key
        forger._counter = 10**9  # counters far ahead, as a replay-evading forger would pick
        for chunk in forger.seal(10**6, [b"h", bytes(3 * MiB)]):
            sock.send(chunk, copy=False)
        sock.send(secrets.token_bytes(100))  # not even a chunk
        deadline = time.monotonic() + 10
        while _counters(tcp_bob).get("bulk_dropped", 0) < before + 5:
            assert time.monotonic() < deadline, "the forged chunks were not seen"
    finally:
        sock.close(linger=0)
        ctx.term()
    # the victim's channel still works: its counters were not advanced by the forgeries
    y = torch.randn(2 * MiB)
    assert torch.equal((p + y.send(tcp_bob)).get(), x + y)
    assert _counters(tcp_bob)["sealed_messages_in"] >= 2


def _hello_reply(worker: sy.WorkerClient) -> HelloReply:
    return worker.session.conn(worker).peer_info()


def _raw_hello(sock: zmq.Socket, secret: bytes) -> HelloReply:
    sock.send_multipart(encode_message(Op.HELLO, 1, Hello(
        peer="raw", bulk=zmq.utils.z85.encode(secret).decode())))
    msg = next_reply(sock)
    assert msg.op is Op.REPLY, msg.body
    return HelloReply.from_wire(msg.body)


def test_a_marker_whose_data_never_comes_is_answered_in_time_and_later_requests_keep_order(
        hook: sy.TorchHook) -> None:
    cfg = replace(get_session().cfg, shm_threshold=0, timeout=1.5)
    w = sy.spawn_worker("bob", transport_kind="tcp", config=cfg)
    alive = alive_check(w)
    try:
        with raw_dealer(w) as sock:
            _raw_hello(sock, bulk.new_secret())
            # a marker for a blob never sent, then an ordinary request behind it
            sock.send_multipart(encode_message(Op.BULK, 2, Bulk(blob=2, frames=2, nbytes=MiB)))
            sock.send_multipart(encode_message(Op.PING, 3, Ping()))
            started = time.monotonic()
            exc = expect_error(sock, 2, RequestTimeout, alive)
            assert "bulk socket" in str(exc)
            assert 1.0 < time.monotonic() - started < 10
            assert next_reply(sock, alive=alive).req_id == 3  # after it, as sent
            # a marker on a connection whose HELLO opened no channel: refused at once
        with raw_dealer(w) as sock:
            sock.send_multipart(encode_message(Op.HELLO, 1, Hello(peer="raw")))
            next_reply(sock)
            sock.send_multipart(encode_message(Op.BULK, 2, Bulk(blob=1, frames=2, nbytes=MiB)))
            exc = expect_error(sock, 2, sy.ProtocolError, alive)
            assert "no bulk channel" in str(exc)
    finally:
        w.close()


def test_requests_behind_a_sealed_message_wait_for_it_and_keep_their_order(
        tcp_bob: sy.WorkerClient) -> None:
    """The marker first, then a GET of what the sealed PUT stores, then the PUT's chunks: the
    GET is answered after the PUT, with its data."""
    secret = bulk.new_secret()
    keys = bulk.ChannelKeys(secret, caller=True)
    with raw_dealer(tcp_bob) as sock:
        hello = _raw_hello(sock, secret)
        ctx = zmq.Context()
        bulk_sock = transport.make_bulk_dealer(
            ctx, bulk_address(tcp_bob.address, hello.bulk), tcp_bob.session.cfg,
            keys.user, keys.ticket, bulk.MAX_CHUNK_MESSAGE)
        try:
            x = torch.randn(MiB)
            frames = encode_message(Op.PUT, 2, Put(id=424242, obj=x))
            sock.send_multipart(encode_message(Op.BULK, 2, Bulk(
                blob=2, frames=len(frames), nbytes=bulk.blob_size(frames))))
            sock.send_multipart(encode_message(Op.GET, 3, Get(id=424242)))
            for chunk in bulk.Sealer(keys.channel, keys.send_key).seal(2, frames):
                bulk_sock.send(chunk, copy=False)
            first, second = next_reply(sock), next_reply(sock)
            assert first.req_id == 2 and first.op is Op.REPLY
            # the GET's answer is large too: it comes sealed to where our chunks came from
            assert second.req_id == 3 and second.op is Op.BULK
            marker = Bulk.from_wire(second.body)
            opener = bulk.Opener(keys.channel, keys.recv_key)
            while True:
                assert bulk_sock.poll(10_000), "the sealed reply did not come"
                if opener.open(bulk_sock.recv()) == marker.blob:
                    break
            frames = opener.take(marker.blob)
            assert frames is not None and len(frames) == marker.frames
            reply = decode_message(frames)
            assert reply.op is Op.REPLY and reply.req_id == 3
            assert torch.equal(GetReply.from_wire(reply.body).obj, x)
        finally:
            bulk_sock.close(linger=0)
            ctx.term()


def test_a_move_between_workers_goes_sealed_on_the_peer_link(hook: sy.TorchHook) -> None:
    cfg = replace(get_session().cfg, shm_threshold=0)
    bob = sy.spawn_worker("bob", transport_kind="tcp", config=cfg)
    alice = sy.spawn_worker("alice", transport_kind="tcp", config=cfg)
    try:
        # (our connection to alice first: a large reply to a connection's very first request
        # goes inside it when its bulk socket's attach has not reached the worker yet)
        alice.ping()
        with _no_shm():
            x = torch.randn(2 * MiB)
            p = x.send(bob)
            p.move(alice)  # bob PUTs it to alice over their link
            assert p.location is alice
            assert _counters(alice)["sealed_messages_in"] == 1  # bob's PUT
            assert _counters(alice).get("sealed_messages_out", 0) == 0  # (not to the link)
            assert torch.equal(p.get(), x)
            assert _counters(alice)["sealed_messages_out"] == 1  # our get
    finally:
        bob.close()
        alice.close()


def test_a_shell_worker_binds_its_bulk_socket_where_told_and_says_where(hook: sy.TorchHook) -> None:
    """``--bulk-bind``: a fixed port a firewall can let through; the startup line names it, and
    a client's large tensors go there. One that cannot be bound stops the worker with a clear
    message (not a worker without it)."""
    import socket
    with socket.socket() as s:  # a free port, then let go for the worker
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with cli_worker("--id", "bob", "--bulk-bind", f"tcp://127.0.0.1:{port}") as w:
        assert w.line.endswith(f"large messages sealed on tcp://127.0.0.1:{port}"), w.line
        bob = w.connect()
        try:
            with _no_shm():
                x = torch.randn(2 * MiB)
                assert torch.equal(x.send(bob).get(), x)
                assert _counters(bob)["sealed_messages_in"] == 1
        finally:
            bob.close()  # (the session forgets it before its process goes)
        with socket.socket() as taken:  # now someone holds a port: a second worker there fails
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            done = run_cli("worker", "--id", "carol", "--bulk-bind",
                           f"tcp://127.0.0.1:{taken.getsockname()[1]}")
        assert done.returncode == 1, done
        assert "cannot bind" in done.stderr and "Address already in use" in done.stderr, done.stderr
