"""Tags, descriptions, search, the grid and the sandbox (PySyft 0.2's tutorials Parts 5, 7, 8).

``tensor.tag(...).describe(...)`` travel with the tensor (send, get, move, remote_get, copy);
a tagged tensor is published: every principal the worker accepts finds it with ``search()`` as
a read-only capability, which the worker enforces (raw sockets included); tags and descriptions
are checked by the worker like every other field. ``create_sandbox`` runs Part 5's flow on real
worker processes.
"""

from __future__ import annotations

import gc
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq

import zmqsyft as sy
from tests.helpers import (
    alive_check,
    assert_answers_ping,
    expect_error,
    next_reply,
    raw_dealer,
    run_script,
    second_client,
)
from zmqsyft import WorkerClient
from zmqsyft.errors import AccessDenied, ObjectNotFound, PointerError, PrivacyError, ProtocolError
from zmqsyft.wire.codec import encode_message
from zmqsyft.wire.messages import ObjRef, Op, PointerDesc
from zmqsyft.wire.tags import MAX_DESCRIPTION_CHARS, MAX_TAG_CHARS, MAX_TAGS

pytestmark = pytest.mark.timeout(120)

HOSPITAL1 = "The input datapoints to the hospital1 dataset."


def ok(sock: zmq.Socket, req_id: int) -> Any:
    msg = next_reply(sock)
    assert (msg.op, msg.req_id) == (Op.REPLY, req_id), msg.body
    return msg.body


def ids(pointers: list[Any]) -> set[int]:
    return {p.id_at_location for p in pointers}


# ------------------------------------------------------------------ local tensors
def test_tag_and_describe_are_chainable_and_kept_by_copy(hook: sy.TorchHook) -> None:
    x = torch.tensor([1, 2, 3]).tag("#radio", "#hospital1").describe(HOSPITAL1)
    assert isinstance(x, torch.Tensor) and x.tags == {"#radio", "#hospital1"}
    assert x.description == HOSPITAL1
    assert x.tag("#radio", "#more") is x and x.tags == {"#radio", "#hospital1", "#more"}
    y = x.copy()
    assert y.tags == x.tags and y.tags is not x.tags and y.description == HOSPITAL1
    plain = torch.zeros(2)
    assert plain.tags == set() and plain.description is None
    plain.tags = ["#a"]  # PySyft's sandbox assigned them, too
    plain.description = "d"
    assert (plain.tags, plain.description) == ({"#a"}, "d")


def test_bad_tags_and_descriptions_are_refused_where_they_are_made(hook: sy.TorchHook) -> None:
    t = torch.zeros(1)
    with pytest.raises(TypeError, match="a tag is a str"):
        t.tag(5)
    with pytest.raises(TypeError, match="a tag is a str"):
        t.tag(["#a", "#b"])  # each tag its own argument
    with pytest.raises(ValueError, match=f"more than the {MAX_TAG_CHARS}"):
        t.tag("#" + "x" * MAX_TAG_CHARS)
    with pytest.raises(ValueError, match="unprintable"):
        t.tag("#a\n#b")
    with pytest.raises(ValueError, match="is empty"):
        t.tag("")
    with pytest.raises(ValueError, match=f"more than the {MAX_TAGS}"):
        t.tag(*(f"#{i}" for i in range(MAX_TAGS + 1)))
    with pytest.raises(TypeError, match="a description is a str"):
        t.describe(3)
    with pytest.raises(ValueError, match="control characters"):
        t.describe("red \x1b[31m alert")
    with pytest.raises(ValueError, match=f"more than the {MAX_DESCRIPTION_CHARS}"):
        t.describe("x" * (MAX_DESCRIPTION_CHARS + 1))
    with pytest.raises(TypeError):
        t.tags = [1]
    assert t.tags == set() and t.description is None  # nothing half-done


# ------------------------------------------------------------ through the workers
def test_tags_and_description_travel_with_send_get_move_and_copy(
        bob: WorkerClient, alice: WorkerClient) -> None:
    ptr = torch.tensor([1, 2, 3, 4, 5]).tag("#radio", "#hospital1").describe(HOSPITAL1).send(bob)
    assert ptr.tags == {"#radio", "#hospital1"} and ptr.description == HOSPITAL1
    (found,) = bob.search("#radio")
    assert (found.tags, found.description) == (ptr.tags, HOSPITAL1)
    dup = ptr.copy()  # made on bob, tagged like its original
    assert dup.location is bob and dup.tags == ptr.tags and dup.description == HOSPITAL1
    assert ids(bob.search("#hospital1")) == {ptr.id_at_location, dup.id_at_location}
    ptr.move(alice)
    assert ids(alice.search("#radio")) == {ptr.id_at_location}
    assert alice.search("#radio")[0].description == HOSPITAL1
    assert ids(bob.search("#radio")) == {dup.id_at_location}
    back = ptr.get()
    assert torch.equal(back, torch.tensor([1, 2, 3, 4, 5]))
    assert back.tags == {"#radio", "#hospital1"} and back.description == HOSPITAL1
    assert alice.search("#radio") == []
    # a pointer chain: remote_get brings the data and its tags to the middle worker
    chain = dup.send(alice)
    chain.remote_get()
    (moved,) = alice.search("#radio")
    assert moved.id_at_location == chain.id_at_location and moved.description == HOSPITAL1
    assert torch.equal(chain.get(), torch.tensor([1, 2, 3, 4, 5]))
    assert bob.search() == [] and alice.search() == []


def test_tagging_a_pointer_publishes_what_it_points_to(bob: WorkerClient) -> None:
    ptr = torch.ones(2, 3).send(bob)
    assert bob.search() == [] and ptr.tags == frozenset() and ptr.description is None
    assert ptr.tag("#late", "#x").describe("first line\nsecond line") is ptr
    assert ptr.tags == {"#late", "#x"}
    (found,) = bob.search("#late")
    assert found.tags == {"#late", "#x"} and found.description == "first line\nsecond line"
    ptr.describe("")  # no description any more
    assert bob.search("#late")[0].description is None and ptr.description is None
    with pytest.raises(AttributeError, match=r"\.tag\("):
        ptr.tags = {"#y"}
    with pytest.raises(AttributeError, match=r"\.describe\("):
        ptr.description = "z"
    with pytest.raises(ValueError, match="unprintable"):
        ptr.tag("#bad\t")
    assert bob.search("#late")[0].tags == {"#late", "#x"}


def test_search_matches_every_tag_exactly_and_never_the_description(bob: WorkerClient) -> None:
    x = torch.tensor([1, 2, 3, 4, 5]).tag("#radio", "#hospital1").describe(HOSPITAL1).send(bob)
    y = torch.tensor([5, 4, 3, 2, 1]).tag("#radio", "#hospital2").describe("hospital2's").send(bob)
    z = torch.tensor([1, 2, 3]).tag("#fun", "#mnist").describe("The images of MNIST").send(bob)
    hidden = torch.ones(1).describe("#radio, but not a tag").send(bob)  # untagged: not published
    assert ids(bob.search("#radio")) == {x.id_at_location, y.id_at_location}
    assert ids(bob.search(["#radio"])) == ids(bob.search("#radio"))  # PySyft's list form
    assert ids(bob.search("#radio", "#hospital2")) == {y.id_at_location}
    assert ids(bob.search(["#radio", "#hospital2"])) == {y.id_at_location}
    assert bob.search("#radio", "#mnist") == []
    assert bob.search("#radi") == [] and bob.search("#RADIO") == []  # exact matches only
    assert bob.search("hospital1") == [] and bob.search("MNIST") == []  # not the description
    assert ids(bob.search()) == ids([x, y, z])  # every published tensor, not `hidden`
    assert hidden.id_at_location not in ids(bob.search())


def test_search_results_show_tags_shape_and_description(bob: WorkerClient) -> None:
    x = torch.zeros(2, 3).tag("#radio", "#hospital1").describe(HOSPITAL1 + "\nmore").send(bob)
    (found,) = bob.search("#radio")
    text = repr(found)
    assert text.startswith(f"(Wrapper)>[PointerTensor | me:{found.id} -> bob:{x.id_at_location}]")
    assert "\n\tTags: #hospital1 #radio" in text
    assert "\n\tShape: torch.Size([2, 3])" in text
    assert f"\n\tDescription: {HOSPITAL1}..." in text and "more" not in text
    plain = torch.zeros(1).send(bob)
    assert "\n" not in repr(plain)  # untagged pointers print as before


def test_the_owner_finds_its_own_objects_as_non_owning_pointers(bob: WorkerClient,
                                                                alice: WorkerClient) -> None:
    x = torch.arange(4.0).tag("#mine").send(bob)
    (found,) = bob.search("#mine")
    assert x.owned and not found.owned
    assert torch.equal((found * 2).get(), torch.arange(4.0) * 2)  # compute with it
    with pytest.raises(PointerError, match="does not own"):
        found.get()
    with pytest.raises(PointerError, match="does not own"):
        found.move(alice)
    del found
    gc.collect()
    assert list(bob._objects) == [x.id_at_location]  # dropping a search result frees nothing
    assert torch.equal(x.get(), torch.arange(4.0))  # the pointer send() returned owns it


# --------------------------------------------------------------- a second client
def test_a_second_client_finds_published_objects_but_cannot_take_change_or_retag_them(
        bob: WorkerClient, alice: WorkerClient) -> None:
    published = torch.tensor([1.0, 2.0, 3.0]).tag("#radio").describe(HOSPITAL1).send(bob)
    private = torch.tensor([7.0]).send(bob)  # untagged: nobody else finds or sees it
    target, other = published.id_at_location, private.id_at_location
    alive = alive_check(bob)
    mallory = second_client(bob, alice)
    with raw_dealer(bob, keys=mallory) as sock:
        sock.send_multipart(encode_message(Op.SEARCH, 1, {"tags": ["#radio"]}))
        body = ok(sock, 1)
        (desc,) = body["results"]
        assert isinstance(desc, PointerDesc) and desc.id_at_location == target and not desc.owned
        assert body["tags"] == [["#radio"]] and body["descriptions"] == [HOSPITAL1]
        sock.send_multipart(encode_message(Op.SEARCH, 2, {"tags": []}))
        assert [d.id_at_location for d in ok(sock, 2)["results"]] == [target]
        # computing with it works: the result is mallory's own, and it may take that
        sock.send_multipart(encode_message(Op.CALL, 3, {
            "fn": "torch.mul", "args": [ObjRef(target), 2.0], "kwargs": {},
            "out": [[555, [3], "float32", False]]}))
        ok(sock, 3)
        sock.send_multipart(encode_message(Op.GET, 4, {"id": 555}))
        assert torch.equal(ok(sock, 4)["obj"], torch.tensor([2.0, 4.0, 6.0]))
        refused = [
            (Op.GET, {"id": target}),
            (Op.MOVE, {"id": target, "dest_address": alice.address, "dest_key": alice.key}),
            (Op.REMOTE_GET, {"id": target}),
            (Op.GIVE, {"ids": [target], "to": mallory.text}),
            (Op.CALL, {"fn": "torch.Tensor.add_", "args": [ObjRef(target), 100.0], "kwargs": {},
                       "out": None}),
            (Op.TAG, {"id": target, "tags": ["#poisoned"]}),
            (Op.TAG, {"id": target, "description": "mine now"}),
            (Op.TAG, {"id": target, "description": ""}),
        ]
        for req_id, (op, req) in enumerate(refused, start=10):
            sock.send_multipart(encode_message(op, req_id, req))
            exc = expect_error(sock, req_id, AccessDenied, alive)
            assert "read-only" in str(exc)
        # the untagged one: not found at all, not even to tag it (that would publish it)
        for req_id, req in enumerate([{"id": other, "tags": ["#stolen"]},
                                      {"id": other, "description": "x"}], start=30):
            sock.send_multipart(encode_message(Op.TAG, req_id, req))
            expect_error(sock, req_id, ObjectNotFound, alive)
        sock.send_multipart(encode_message(Op.DEL, 40, {"ids": [target, other]}))  # passed over
        ok(sock, 40)
        sock.send_multipart(encode_message(Op.OBJECTS, 41, {}))
        assert ok(sock, 41)["objects"] == {}  # mallory lists none of them
    assert_answers_ping(bob)
    (still,) = bob.search("#radio")
    assert (still.tags, still.description) == ({"#radio"}, HOSPITAL1)
    assert bob.search("#poisoned") == [] and bob.search("#stolen") == []
    assert torch.equal(published.get(), torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(private.get(), torch.tensor([7.0]))


def test_nobody_retags_a_data_owners_data_and_its_labels_still_hold(
        spawn: Any, tmp_path: Path) -> None:
    torch.save({"data": torch.arange(6.0)}, tmp_path / "d.pt")
    clinic = spawn("clinic", load=str(tmp_path / "d.pt"), tags=["#d"])  # private to clinic
    (data,) = clinic.search("#d", "#data")
    assert data.tags == {"#d", "#data"}
    with pytest.raises(AccessDenied, match="read-only"):
        data.tag("#mine")  # not even its spawner (an admin) owns the worker's own data
    with pytest.raises(AccessDenied, match="read-only"):
        data.describe("mine")
    mallory = second_client(clinic)
    with raw_dealer(clinic, keys=mallory) as sock:
        sock.send_multipart(encode_message(Op.TAG, 1, {"id": data.id_at_location, "tags": ["#x"]}))
        expect_error(sock, 1, ObjectNotFound, worker_id="clinic")  # never searched: unseen
    # a derived result may be published by its owner: it stays labelled, so it still cannot leave
    doubled = (data * 2).tag("#derived")
    (found,) = clinic.search("#derived")
    with pytest.raises(PrivacyError):
        doubled.get()
    with pytest.raises(PrivacyError):
        (found + 0).get()
    assert clinic.search("#d", "#data")[0].tags == {"#d", "#data"}


def test_bad_tags_on_the_wire_are_refused_and_the_worker_serves_on(bob: WorkerClient) -> None:
    alive = alive_check(bob)
    mallory = second_client(bob)
    long_tag, many = "#" + "x" * MAX_TAG_CHARS, [f"#{i}" for i in range(MAX_TAGS + 1)]
    with raw_dealer(bob, keys=mallory) as sock:
        attempts: list[tuple[Op, dict, type[BaseException], str]] = [
            (Op.PUT, {"id": 901, "obj": torch.ones(1), "tags": [5]}, ProtocolError, "'tags'"),
            (Op.PUT, {"id": 902, "obj": torch.ones(1), "tags": "#a"}, ProtocolError, "'tags'"),
            (Op.PUT, {"id": 903, "obj": torch.ones(1), "tags": [long_tag]}, ValueError,
             f"more than the {MAX_TAG_CHARS}"),
            (Op.PUT, {"id": 904, "obj": torch.ones(1), "tags": many}, ValueError,
             f"more than the {MAX_TAGS}"),
            (Op.PUT, {"id": 905, "obj": torch.ones(1), "tags": ["#a\x1b[2J"]}, ValueError,
             "unprintable"),
            (Op.PUT, {"id": 906, "obj": torch.ones(1), "description": 7}, ProtocolError,
             "'description'"),
            (Op.PUT, {"id": 907, "obj": torch.ones(1),
                      "description": "x" * (MAX_DESCRIPTION_CHARS + 1)}, ValueError,
             f"more than the {MAX_DESCRIPTION_CHARS}"),
            (Op.PUT, {"id": 908, "obj": 3, "tags": ["#n"]}, TypeError, "with a tensor only"),
            (Op.SEARCH, {"tags": many}, ValueError, f"more than the {MAX_TAGS}"),
            (Op.SEARCH, {"tags": [""]}, ValueError, "is empty"),
            (Op.TAG, {"id": 911, "tags": ["#a"]}, ObjectNotFound, "does not exist"),
        ]
        for req_id, (op, req, error, words) in enumerate(attempts, start=1):
            sock.send_multipart(encode_message(op, req_id, req))
            exc = expect_error(sock, req_id, error, alive)
            assert words in str(exc) and ("bob" in str(exc) or error is ProtocolError), exc
        # one of mallory's own: tagging it past the limit is refused too, and changes nothing
        sock.send_multipart(encode_message(Op.PUT, 50, {"id": 950, "obj": torch.ones(1),
                                                        "tags": many[:MAX_TAGS]}))
        ok(sock, 50)
        sock.send_multipart(encode_message(Op.TAG, 51, {"id": 950, "tags": ["#one-more"]}))
        expect_error(sock, 51, ValueError, alive)
        sock.send_multipart(encode_message(Op.TAG, 52, {"id": 950, "description": "a\x00b"}))
        expect_error(sock, 52, ValueError, alive)
        sock.send_multipart(encode_message(Op.SEARCH, 53, {"tags": ["#0"]}))
        found = ok(sock, 53)
        assert found["tags"] == [sorted(many[:MAX_TAGS])] and found["descriptions"] == [""]
        sock.send_multipart(encode_message(Op.OBJECTS, 54, {}))
        assert list(ok(sock, 54)["objects"]) == [950]  # nothing refused was stored
        sock.send_multipart(encode_message(Op.DEL, 55, {"ids": [950]}))
        ok(sock, 55)
    assert_answers_ping(bob)
    with pytest.raises(ValueError, match=f"more than the {MAX_TAGS}"):
        bob.search(*many)  # refused here, before asking


# ---------------------------------------------------------------------- the grid
def test_a_grid_searches_every_worker_and_lists_those_with_results(
        bob: WorkerClient, alice: WorkerClient, carol: WorkerClient) -> None:
    on_bob = torch.ones(2).tag("#boston", "#data").send(bob)
    on_alice = torch.ones(3).tag("#boston", "#target").send(alice)
    grid = sy.PrivateGridNetwork(bob, alice, carol)
    assert repr(grid) == "<PrivateGridNetwork of 3 workers: bob, alice, carol>"
    found = grid.search("#boston")
    assert list(found) == ["bob", "alice"]  # carol has none: left out, as in PySyft
    assert ids(found["bob"]) == {on_bob.id_at_location}
    assert ids(found["alice"]) == {on_alice.id_at_location}
    assert list(grid.search("#boston", "#data")) == ["bob"]
    assert grid.search(["#boston", "#target"])["alice"][0].tags == {"#boston", "#target"}
    assert grid.search("#nothing") == {}
    with pytest.raises(TypeError, match="worker handles"):
        sy.PrivateGridNetwork("bob")


# ------------------------------------------------------------------- the sandbox
@pytest.mark.timeout(300)
def test_the_sandbox_runs_part_5s_flow_and_its_workers_are_reaped(hook: sy.TorchHook) -> None:
    names = ["bob", "theo", "jason", "alice", "andy", "jon"]
    ns: dict[str, Any] = {}
    sandbox = sy.create_sandbox(ns, verbose=False)
    try:
        assert set(ns) == {"hook", *names, "workers", "grid", "sandbox"}
        assert ns["sandbox"] is sandbox and isinstance(ns["hook"], sy.TorchHook)
        assert [w.id for w in ns["workers"]] == names and ns["grid"].workers == ns["workers"]
        assert all(ns[n] is w for n, w in zip(names, ns["workers"], strict=True))
        grid = ns["grid"]
        for name, rows in (("diabetes", 442), ("breast_cancer", 569), ("digits", 1797),
                           ("iris", 150), ("wine", 178), ("linnerud", 20)):
            data, target = grid.search(f"#{name}", "#data"), grid.search(f"#{name}", "#target")
            assert list(data) == names and list(target) == names, name  # a part on each
            assert sum(len(ps[0]) for ps in data.values()) == rows
            assert sum(len(ps[0]) for ps in target.values()) == rows
            part = data["alice"][0]
            assert part.tags == {f"#{name}", "#data"} and part.description
            assert "rows" in part.description.splitlines()[0]
        # Part 5/7: search the regression data, train a linear model on the found pointers
        data, target = grid.search("#diabetes", "#data"), grid.search("#diabetes", "#target")
        model = torch.nn.Linear(data["alice"][0].shape[1], 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = []
        for _ in range(4):
            total = 0.0
            for worker_id in data:
                x, y = data[worker_id][0], target[worker_id][0]
                model.send(x.location)
                opt.zero_grad()
                loss = ((model(x).view(-1) - y) ** 2).mean()
                loss.backward()
                opt.step()
                model.get()
                total += loss.get().item()
            losses.append(total)
        assert losses[-1] < losses[0] * 0.8, losses
        assert not isinstance(model.weight, sy.PointerTensor)  # the model is back here
        # the data stays: the sandbox owns it, search results own nothing
        del data, target, x, y
        gc.collect()
        assert len(grid.search("#diabetes")) == 6
        assert "bob" in repr(sandbox) and "diabetes" in repr(sandbox)
    finally:
        sandbox.close()
    procs = [w._proc for w in sandbox.workers]
    assert all(p is not None and p.poll() is not None for p in procs)  # every one reaped
    assert all(w.closed for w in ns["workers"]) and sandbox.data == {}



@pytest.mark.timeout(300)
def test_example_06_sandbox_runs_as_it_stands() -> None:
    result = run_script("examples/06_sandbox.py", "--steps", "3", timeout=240)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Description: The input datapoints to the hospital1 dataset." in out
    assert "Tags: #data #diabetes" in out
    assert "<PrivateGridNetwork of 6 workers: bob, theo, jason, alice, andy, jon>" in out
    losses = [float(v) for v in re.findall(r"step +\d+ +loss summed over the 6 workers +([\d.]+)", out)]
    assert len(losses) == 3 and losses[-1] < losses[0], out
    assert "the sandbox's workers are stopped: True" in out
