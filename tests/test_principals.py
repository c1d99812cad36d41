"""Who is asking: keys, principals, ownership, capabilities and admin rights, tried as an attacker.

Every attack here speaks the protocol on a raw socket of its own (``raw_dealer``), as a second
client whose key the worker accepts (``second_client``: it may connect, nothing more), or with a
key it does not know. Each test asserts what the attacker gets (an error naming the object as
missing, or as read-only, or the operation as an admin's) and that the victim's objects are
unchanged. Before issue 12 every connection could list, take, change and delete every object
and stop the worker (the same requests from a plain socket all succeeded).
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq

import zmqsyft as sy
from tests.helpers import (
    STARTUP,
    _cli_worker,
    alive_check,
    assert_answers_ping,
    cli_worker,
    expect_error,
    next_reply,
    raw_dealer,
    second_client,
)
from zmqsyft import WorkerClient
from zmqsyft.errors import AccessDenied, ObjectNotFound
from zmqsyft.ids import new_id
from zmqsyft.keys import KeyPair, new_keypair
from zmqsyft.wire.codec import encode_message
from zmqsyft.wire.messages import ObjRef, Op

pytestmark = pytest.mark.timeout(90)

DATA = torch.arange(6.0).reshape(3, 2)


def call(fn: str, *args: object, out: list | None = None, **kwargs: object) -> dict:
    return {"fn": fn, "args": list(args), "kwargs": kwargs, "out": out}


def ok(sock: zmq.Socket, req_id: int) -> object:
    msg = next_reply(sock)
    assert (msg.op, msg.req_id) == (Op.REPLY, req_id), msg.body
    return msg.body


def test_a_second_client_cannot_list_get_move_change_give_or_delete_my_objects(
        spawn, hook: sy.TorchHook) -> None:  # type: ignore[no-untyped-def]
    bob, alice = spawn("bob"), spawn("alice")
    mine = torch.tensor([1.0, 2.0, 3.0]).send(bob)
    target = mine.id_at_location
    alive = alive_check(bob)
    mallory = second_client(bob, alice)
    with raw_dealer(bob, keys=mallory) as sock:
        sock.send_multipart(encode_message(Op.OBJECTS, 1, {}))
        assert ok(sock, 1)["objects"] == {}  # it sees none of mine
        attempts = [
            (Op.GET, {"id": target}),
            (Op.MOVE, {"id": target, "dest_address": alice.address, "dest_key": alice.key}),
            (Op.REMOTE_GET, {"id": target}),
            (Op.GIVE, {"ids": [target], "to": mallory.text}),
            (Op.GIVE, {"ids": [target], "to": mallory.text, "read_only": True}),
            (Op.CALL, call("torch.Tensor.add_", ObjRef(target), 100.0)),  # change it
            (Op.CALL, call("torch.Tensor.__setitem__", ObjRef(target), 0, 9.0)),
            (Op.CALL, call("torch.add", ObjRef(target), 1.0)),  # even read it
            (Op.CALL, call("torch.Tensor.clone", ObjRef(target), out=[[new_id(), [3], "float32",
                                                                      False]])),
        ]
        for req_id, (op, body) in enumerate(attempts, start=10):
            sock.send_multipart(encode_message(op, req_id, body))
            exc = expect_error(sock, req_id, ObjectNotFound, alive)
            assert "not yours" in str(exc)
        # a delete of what is not its own is passed over, as an unknown id is
        sock.send_multipart(encode_message(Op.DEL, 30, {"ids": [target]}))
        ok(sock, 30)
        # storing under my id is refused, and changes nothing
        sock.send_multipart(encode_message(Op.PUT, 31, {"id": target, "obj": torch.zeros(3)}))
        msg = next_reply(sock)
        assert msg.op is Op.ERROR
        # not an admin: no SHUTDOWN, no one else's statistics
        sock.send_multipart(encode_message(Op.SHUTDOWN, 32, {}))
        exc = expect_error(sock, 32, AccessDenied, alive)
        assert "admins" in str(exc) and "mallory" in str(exc)
        sock.send_multipart(encode_message(Op.STATS, 33, {}))
        stats = ok(sock, 33)
        # its own: the failure marker left under the result id its refused CALL chose
        assert stats["objects"] == 1 and stats["counters"] == {}
        sock.send_multipart(encode_message(Op.OBJECTS, 35, {}))
        (marker,) = ok(sock, 35)["objects"]
        sock.send_multipart(encode_message(Op.DEL, 36, {"ids": [marker]}))
        ok(sock, 36)
        assert set(stats["principals"]) <= {"mallory"} and set(stats["peers"]) <= {"mallory"}
        sock.send_multipart(encode_message(Op.ALLOW, 34, {"keys": {"x": KeyPair.fresh().text}}))
        expect_error(sock, 34, AccessDenied, alive)
    assert alive()
    assert_answers_ping(bob)
    assert list(bob._objects) == [target]  # the admin (its spawner) sees everything
    assert alice._objects == {}
    assert torch.equal(mine.get(), torch.tensor([1.0, 2.0, 3.0]))


def test_the_owner_itself_still_may_do_all_of_it(spawn, hook: sy.TorchHook) -> None:  # type: ignore[no-untyped-def]
    """The control: the same raw requests from the object's owner succeed."""
    bob = spawn("bob")
    mine = torch.tensor([1.0, 2.0, 3.0]).send(bob)
    target = mine.id_at_location
    with raw_dealer(bob) as sock:  # this process's key: the spawner, the owner
        sock.send_multipart(encode_message(Op.OBJECTS, 1, {}))
        assert list(ok(sock, 1)["objects"]) == [target]
        sock.send_multipart(encode_message(Op.CALL, 2, call("torch.Tensor.add_", ObjRef(target), 1.0)))
        ok(sock, 2)
    assert torch.equal(mine.get(), torch.tensor([2.0, 3.0, 4.0]))


def test_an_unknown_key_gets_no_answer(spawn) -> None:  # type: ignore[no-untyped-def]
    bob = spawn("bob")
    refused_before = bob.stats()["counters"].get("connections_refused", 0)
    with raw_dealer(bob, keys=KeyPair.fresh()) as sock:
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                          | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        try:
            sock.send_multipart(encode_message(Op.PING, 1, {}))
            sock.send_multipart(encode_message(Op.SHUTDOWN, 2, {}))
            assert monitor.poll(10_000), "no handshake event"
            from zmq.utils.monitor import recv_monitor_message
            event = recv_monitor_message(monitor)
            assert event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH and event["value"] == 400
            assert not sock.poll(500)  # and nothing ever comes back
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
    assert bob.stats()["counters"]["connections_refused"] == refused_before + 1
    assert_answers_ping(bob)


def test_a_connection_with_a_wrong_worker_key_fails_its_handshake() -> None:
    """A client with a wrong public key for the worker cannot complete the handshake (nobody
    can stand in for a worker without its secret), and is told what to check."""
    with cli_worker("--id", "carol", "--bind", "tcp://127.0.0.1:0") as worker:
        with pytest.raises(sy.WorkerUnavailable, match="worker_key"):
            sy.connect(worker.endpoint, worker_key=KeyPair.fresh().text,
                       keys=worker.client_keys, timeout=2.0)
        carol = worker.connect()  # the right key: served
        assert_answers_ping(carol)
        carol.close()


@pytest.fixture
def data_owner(spawn, tmp_path: Path) -> WorkerClient:  # type: ignore[no-untyped-def]
    path = tmp_path / "data.pt"
    torch.save({"data": DATA}, path)
    # this process is the data owner here (it may see its data): these tests are about capabilities
    return spawn("hospital", load=str(path), tags=["#private"],
                 policy=sy.Policy(owner=sy.get_session().keys))


def test_search_pointers_compute_but_cannot_take_or_change_the_data(
        data_owner: WorkerClient, hook: sy.TorchHook) -> None:
    owner = data_owner
    (data,) = owner.search("#data")
    data_id = data.id_at_location
    alive = alive_check(owner)
    with raw_dealer(owner) as sock:  # the searcher itself, bypassing the client's own checks
        for req_id, (op, body) in enumerate([
                (Op.GET, {"id": data_id}),
                (Op.MOVE, {"id": data_id, "dest_address": "tcp://127.0.0.1:9", "dest_key": ""}),
                (Op.GIVE, {"ids": [data_id], "to": KeyPair.fresh().text}),
                (Op.CALL, call("torch.Tensor.add_", ObjRef(data_id), 1.0)),
                (Op.CALL, call("torch.Tensor.__setitem__", ObjRef(data_id), 0, 0.0)),
                (Op.CALL, {"fn": "torch.add", "args": [1.0, 2.0], "kwargs": {"out": ObjRef(data_id)},
                           "out": None}),
                (Op.CALL, call("torch.nn.functional.relu", ObjRef(data_id), inplace=True)),
        ], start=1):
            sock.send_multipart(encode_message(op, req_id, body))
            msg = next_reply(sock, alive=alive)
            assert (msg.op, msg.req_id) == (Op.ERROR, req_id), (op, msg.body)
            assert msg.body["error"]["type"] in ("zmqsyft.errors.AccessDenied",
                                                 "zmqsyft.errors.ObjectNotFound"), msg.body
        # a view of it is a copy: changing the view leaves the data as it was
        view = new_id()
        sock.send_multipart(encode_message(Op.CALL, 20, call(
            "torch.Tensor.view", ObjRef(data_id), -1, out=[[view, [6], "float32", False]])))
        ok(sock, 20)
        sock.send_multipart(encode_message(Op.CALL, 21, call("torch.Tensor.mul_", ObjRef(view), 0.0)))
        ok(sock, 21)
        sock.send_multipart(encode_message(Op.DEL, 22, {"ids": [view, data_id]}))
        ok(sock, 22)
    # computing with it works, and gives results this process owns
    assert torch.equal((data * 2).get(), DATA * 2)
    snapshot = owner._objects
    assert torch.equal(snapshot[data_id], DATA)  # unchanged, still there
    with pytest.raises(sy.PointerError):
        data.get()  # (the client refuses it before asking)


def test_a_model_owner_without_search_cannot_even_read_the_data(
        data_owner: WorkerClient, hook: sy.TorchHook) -> None:
    (data,) = data_owner.search("#data")
    mallory = second_client(data_owner)
    with raw_dealer(data_owner, keys=mallory) as sock:  # never searched: no capability
        sock.send_multipart(encode_message(Op.CALL, 1, call("torch.add", ObjRef(data.id_at_location), 0.0)))
        expect_error(sock, 1, ObjectNotFound, worker_id="hospital")
        sock.send_multipart(encode_message(Op.SEARCH, 2, {"tags": ["#data"]}))
        found = ok(sock, 2)["results"]
        assert [d.id_at_location for d in found] == [data.id_at_location]
        # having searched, it may compute with it (and only that)
        sock.send_multipart(encode_message(Op.CALL, 3, call("torch.add", ObjRef(data.id_at_location), 0.0)))
        ok(sock, 3)
        sock.send_multipart(encode_message(Op.GET, 4, {"id": data.id_at_location}))
        expect_error(sock, 4, AccessDenied, worker_id="hospital")


def test_sending_a_pointer_hands_the_data_to_the_next_hop(spawn, hook: sy.TorchHook) -> None:  # type: ignore[no-untyped-def]
    bob, alice = spawn("bob"), spawn("alice")
    on_bob = torch.tensor([1.0, 2.0]).send(bob)
    data_id = on_bob.id_at_location
    chain = on_bob.send(alice)  # me -> alice -> bob: alice owns bob's object now
    alive = alive_check(bob)
    with raw_dealer(bob) as sock:  # this process no longer owns it on bob
        sock.send_multipart(encode_message(Op.GET, 1, {"id": data_id}))
        expect_error(sock, 1, ObjectNotFound, alive)
        sock.send_multipart(encode_message(Op.OBJECTS, 2, {}))
        assert ok(sock, 2)["objects"].keys() == {data_id}  # (an admin still sees it)
    assert torch.equal((chain + chain).get().get(), torch.tensor([2.0, 4.0]))  # relayed by alice
    inner = chain.get()  # the record leaves alice: bob's object is ours again
    assert inner.location is bob and inner.owned
    assert torch.equal(inner.get(), torch.tensor([1.0, 2.0]))
    assert bob._objects == {} and alice._objects == {}


def test_a_pointer_whose_data_cannot_be_handed_over_is_not_left_behind(
        tmp_path: Path, hook: sy.TorchHook) -> None:
    """Sending a pointer stores it on the receiver, then has the data's worker GIVE the data to
    the receiver (the process that took it: its session there). If bob refuses (he does not know
    eve's key), the send fails, the pointer stays ours and usable, and eve's copy is freed."""
    bob_dir, eve_dir = tmp_path / "bob-keys", tmp_path / "eve-keys"
    bob_dir.mkdir()
    eve_dir.mkdir()
    new_keypair("bob", str(bob_dir))
    new_keypair("eve", str(eve_dir))
    _, secret = new_keypair("me", str(bob_dir))
    for name in ("bob", "me"):  # eve knows bob and me; bob does not know eve
        shutil.copy(bob_dir / f"{name}.key", eve_dir / f"{name}.key")
    me = KeyPair.load(secret)
    address = {n: f"ipc://{tmp_path}/{n}.sock" for n in ("bob", "eve")}
    handles: list[WorkerClient] = []
    try:
        with _cli_worker(("--id", "bob", "--bind", address["bob"], "--keys", str(bob_dir),
                          "--allow", str(bob_dir), "--admin", str(bob_dir / "me.key")),
                         STARTUP, None), \
             _cli_worker(("--id", "eve", "--bind", address["eve"], "--keys", str(eve_dir),
                          "--allow", str(eve_dir), "--admin", str(eve_dir / "me.key")),
                         STARTUP, None):
            for name, folder in (("bob", bob_dir), ("eve", eve_dir)):
                handles.append(sy.connect(address[name], worker_key=str(folder / f"{name}.key"),
                                          keys=me))
            bob, eve = handles
            data = torch.arange(3.0).send(bob)
            with pytest.raises(AccessDenied, match="knows no principal"):
                data.send(eve)
            assert torch.equal((data + 1).get(), torch.arange(3.0) + 1)  # still ours, usable
            deadline, left = time.monotonic() + 30, None
            while time.monotonic() < deadline:  # (its delete is queued: polled)
                try:
                    left = eve._objects
                except sy.LimitExceeded as exc:
                    # eve's own link to bob (for the pointer, then its delete) was refused: bob
                    # does not know her. Her FLUSH says so, as it should: not what is tested here
                    assert "bob.sock" in str(exc) and "refused" in str(exc), exc
                else:
                    if not left:
                        break
                threading.Event().wait(0.1)
            assert left == {}, "eve kept the pointer whose data bob did not give her"
            assert torch.equal(data.get(), torch.arange(3.0))
    finally:
        for handle in handles:
            handle.close()


def test_a_forged_descriptor_to_an_unknown_peer_is_refused(spawn, hook: sy.TorchHook) -> None:  # type: ignore[no-untyped-def]
    """A worker connects only to peers whose key it knows: a pointer naming a stranger's
    address and key is refused when it arrives, before anything is sent there."""
    from zmqsyft.wire.messages import PointerDesc

    bob = spawn("bob")
    stranger = KeyPair.fresh().text
    with raw_dealer(bob) as sock:
        sock.send_multipart(encode_message(Op.PUT, 1, {"id": 5, "obj": PointerDesc(
            "eve", "tcp://127.0.0.1:9", 1, 5, (3,), "float32", False, True, stranger)}))
        exc = expect_error(sock, 1, AccessDenied)
        assert "is not one it knows" in str(exc)
        sock.send_multipart(encode_message(Op.PUT, 2, {"id": 6, "obj": PointerDesc(
            "eve", "tcp://127.0.0.1:9", 1, 6, (3,), "float32", False, True, "")}))
        exc = expect_error(sock, 2, AccessDenied)
        assert "no public key" in str(exc)
    assert bob._objects == {}


def test_stats_count_objects_and_bytes_per_principal(spawn, hook: sy.TorchHook) -> None:  # type: ignore[no-untyped-def]
    bob = spawn("bob")
    kept = [torch.zeros(256).send(bob) for _ in range(3)]
    mallory = second_client(bob)
    with raw_dealer(bob, keys=mallory) as sock:
        sock.send_multipart(encode_message(Op.PUT, 1, {"id": new_id(), "obj": torch.zeros(64)}))
        ok(sock, 1)
        rows = bob.stats()["principals"]
        me = sy.get_session().name
        assert rows[me]["objects"] == 3 and rows[me]["bytes"] == 3 * 256 * 4
        assert rows["mallory"]["objects"] == 1 and rows["mallory"]["bytes"] == 64 * 4
        peers = bob.stats()["peers"]
        assert peers["mallory"]["messages_in"] >= 1  # its traffic, under the name of its key
    del kept


def test_a_pointer_to_someone_elses_object_here_frees_nothing_of_theirs(
        spawn, hook: sy.TorchHook) -> None:  # type: ignore[no-untyped-def]
    """A second client stores an owning pointer record naming my object on the same worker,
    then deletes it (or uses, moves or gets it): the delete must not cascade into my object."""
    from zmqsyft.wire.messages import PointerDesc

    bob = spawn("bob")
    mine = torch.tensor([4.0, 5.0]).send(bob)
    target = mine.id_at_location
    alive = alive_check(bob)
    with raw_dealer(bob, keys=second_client(bob)) as sock:
        forged = PointerDesc("bob", bob.address, target, 77, (2,), "float32", False, True, bob.key)
        sock.send_multipart(encode_message(Op.PUT, 1, {"id": 77, "obj": forged}))
        ok(sock, 1)
        sock.send_multipart(encode_message(Op.CALL, 2, call("torch.neg", ObjRef(77))))
        expect_error(sock, 2, ObjectNotFound, alive)
        sock.send_multipart(encode_message(Op.REMOTE_GET, 3, {"id": 77}))
        expect_error(sock, 3, ObjectNotFound, alive)
        sock.send_multipart(encode_message(Op.DEL, 4, {"ids": [77]}))
        ok(sock, 4)
    assert list(bob._objects) == [target]
    assert torch.equal(mine.get(), torch.tensor([4.0, 5.0]))


def test_a_pointer_to_the_data_owners_data_frees_nothing_of_it(
        data_owner: WorkerClient, hook: sy.TorchHook) -> None:
    from zmqsyft.wire.messages import PointerDesc

    (data,) = data_owner.search("#data")
    with raw_dealer(data_owner, keys=second_client(data_owner)) as sock:
        forged = PointerDesc("hospital", data_owner.address, data.id_at_location, 78, (3, 2),
                             "float32", False, True, data_owner.key)
        sock.send_multipart(encode_message(Op.PUT, 1, {"id": 78, "obj": forged}))
        ok(sock, 1)
        sock.send_multipart(encode_message(Op.DEL, 2, {"ids": [78]}))
        ok(sock, 2)
    assert torch.equal(data_owner._objects[data.id_at_location], DATA)


def test_a_server_without_the_peers_secret_cannot_stand_in_for_it(spawn, hook: sy.TorchHook) -> None:  # type: ignore[no-untyped-def]
    """A descriptor naming a known peer's key, at an address where something else listens: the
    worker's CURVE handshake there fails, so the impostor never sees a request, and the caller
    is told the handshake failed."""
    from tests.helpers import fake_peer
    from zmqsyft.wire.messages import PointerDesc

    bob, alice = spawn("bob"), spawn("alice")
    alice.address  # noqa: B018 - ready: bob knows alice's key
    alive = alive_check(bob)
    with fake_peer() as (impostor, impostor_at, _), raw_dealer(bob) as sock:
        sock.send_multipart(encode_message(Op.PUT, 1, {"id": 66, "obj": PointerDesc(
            "alice", impostor_at, 3, 66, (2,), "float32", False, False, alice.key)}))
        ok(sock, 1)
        sock.send_multipart(encode_message(Op.CALL, 2, call("torch.neg", ObjRef(66))))
        msg = next_reply(sock, timeout=30, alive=alive)
        assert (msg.op, msg.req_id) == (Op.ERROR, 2)
        assert "handshake failed" in msg.body["error"]["message"], msg.body
        assert not impostor.poll(0)  # not one message reached it
        sock.send_multipart(encode_message(Op.DEL, 3, {"ids": [66]}))
        ok(sock, 3)
    assert_answers_ping(bob)


def test_a_failed_connect_with_other_credentials_leaves_a_working_handle_alone() -> None:
    """Found by the LAN test: a refused sy.connect to a worker this process is connected to
    already replaced the handle's keys, and every later request of the handle failed."""
    with cli_worker("--id", "carol", "--bind", "tcp://127.0.0.1:0") as worker:
        carol = worker.connect()
        assert_answers_ping(carol)
        with pytest.raises(ValueError, match="another key"):
            sy.connect(worker.endpoint, worker_key=worker.key, keys=KeyPair.fresh())
        with pytest.raises(sy.WorkerUnavailable, match="worker_key"):
            sy.connect(worker.endpoint, worker_key=KeyPair.fresh().text, timeout=2.0)
        assert_answers_ping(carol)  # still served, as the key it connected with
        assert sy.connect(worker.endpoint) is carol
        carol.close()


def test_giving_and_storing_for_others_is_bounded_by_the_receivers_share(
        spawn, hook: sy.TorchHook) -> None:  # type: ignore[no-untyped-def]
    """A client cannot fill the store by giving its objects away (GIVE) or storing them for
    someone else (PUT owner): what lands on another principal counts against its share, and
    only a principal the worker knows can receive anything."""
    mib = 1 << 20
    bob = spawn("bob", config=sy.Config(max_store_bytes=64 * mib))  # 32 MiB a session
    alive = alive_check(bob)
    mallory, victim = second_client(bob), second_client(bob, name="victim")
    chunk = torch.zeros(2 * mib)  # 8 MiB
    with raw_dealer(bob, keys=mallory) as sock:
        sock.send_multipart(encode_message(Op.PUT, 1, {"id": 50, "obj": chunk,
                                                       "owner": KeyPair.fresh().text}))
        expect_error(sock, 1, AccessDenied, alive)  # nobody the worker knows
        given = []
        for i in range(8):  # 64 MiB handed to the victim, 8 MiB at a time
            sock.send_multipart(encode_message(Op.PUT, 10 + i, {"id": 100 + i, "obj": chunk}))
            ok(sock, 10 + i)
            sock.send_multipart(encode_message(Op.GIVE, 20 + i, {"ids": [100 + i], "to": victim.text}))
            msg = next_reply(sock, alive=alive)
            if msg.op is Op.ERROR:
                assert "max_connection_bytes" in msg.body["error"]["message"], msg.body
                break
            given.append(100 + i)
        assert len(given) == 4  # 32 MiB: the victim's share is full, the store is not
        sock.send_multipart(encode_message(Op.PUT, 40, {"id": 200, "obj": chunk, "owner": victim.text}))
        msg = next_reply(sock, alive=alive)
        assert msg.op is Op.ERROR and "max_connection_bytes" in msg.body["error"]["message"]
    rows = bob.stats()["principals"]
    assert rows["victim"]["bytes"] == 32 * mib and bob.stats()["objects"] <= 5
    with raw_dealer(bob, keys=victim) as sock:  # what it was given is its own to free
        sock.send_multipart(encode_message(Op.DEL, 1, {"ids": given}))
        ok(sock, 1)
    assert "victim" not in bob.stats()["principals"] or bob.stats()["principals"]["victim"]["bytes"] == 0


@pytest.mark.parametrize("any_peer", [False, True])
def test_a_worker_links_to_an_unlisted_peer_only_with_any_peer(
        tmp_path: Path, hook: sy.TorchHook, any_peer: bool) -> None:
    """alice accepts bob, bob does not list alice: by default bob will not link to alice when a
    pointer to her data is sent to him; with ``--any-peer`` he does, over CURVE with the key
    that came with the pointer (and what he may reach is still only what alice gave him)."""
    from tests.helpers import STARTUP, _cli_worker
    from zmqsyft.keys import new_keypair

    keys, bob_allows = tmp_path / "keys", tmp_path / "bob-allows"
    keys.mkdir(), bob_allows.mkdir()
    for name in ("bob", "alice"):
        new_keypair(name, str(keys))
    _, secret = new_keypair("me", str(keys))
    me = KeyPair.load(secret)
    (bob_allows / "me.key").write_bytes((keys / "me.key").read_bytes())
    address = {n: f"ipc://{tmp_path}/{n}.sock" for n in ("bob", "alice")}

    def start(name: str, allow: Path, *extra: str):  # type: ignore[no-untyped-def]
        return _cli_worker(("--id", name, "--bind", address[name], "--keys", str(keys),
                            "--allow", str(allow), "--admin", str(keys / "me.key"), *extra),
                           STARTUP, None)

    with start("alice", keys), start("bob", bob_allows, *(["--any-peer"] if any_peer else [])), \
            contextlib.ExitStack() as handles:  # (closed before the workers stop)
        bob, alice = (handles.enter_context(sy.connect(address[n], worker_key=str(keys / f"{n}.key"),
                                                       keys=me)) for n in ("bob", "alice"))
        on_alice = torch.arange(3.0).send(alice)
        if any_peer:
            chain = on_alice.send(bob)  # bob holds a pointer to alice's data
            assert torch.equal((chain + 1).get().get(), torch.arange(3.0) + 1)
            assert any("unlisted key" in label for label in bob.stats()["peers"]), bob.stats()
            assert torch.equal(chain.get().get(), torch.arange(3.0))
        else:  # refused as it arrives, before bob sends anything to alice; nothing is lost
            with pytest.raises(AccessDenied, match="is not one it knows.*--any-peer"):
                on_alice.send(bob)
            assert bob._objects == {}
            assert torch.equal(on_alice.get(), torch.arange(3.0))
