"""The registry projection: apply, rebuild, recovery, snapshots."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events import Cutoff, InconsistentEvent, Registry, apply, rebuild, recovery_events

from .factories import Events


def stored(events):
    """Give events consecutive seqs, as the store would."""
    return [event.with_seq(seq) for seq, event in enumerate(events, 1)]


def test_users_in_join_order_with_linked_flag():
    ev = Events()
    registry = rebuild(
        stored([ev.listen(), ev.join("bob"), ev.join("alice"), ev.link("alice"), ev.join("carol"), ev.link("bob")])
    )
    assert registry.as_list() == [
        {"username": "bob", "isLinked": True},
        {"username": "alice", "isLinked": True},
        {"username": "carol", "isLinked": False},
    ]
    assert (registry.lobby, registry.session, registry.seq, registry.closed) == ("main", "s1", 6, False)


def test_leave_removes_and_a_rejoin_goes_to_the_end():
    ev = Events()
    registry = rebuild(
        stored([ev.listen(), ev.join("bob"), ev.join("alice"), ev.leave("bob"), ev.join("bob")])
    )
    assert list(registry.users) == ["alice", "bob"]


@pytest.mark.parametrize(
    ("history", "bad", "message"),
    [
        ([], "link:ghost", "link of unknown user 'ghost'"),
        (["join:bob"], "join:bob", "join of existing user 'bob'"),
        ([], "leave:ghost", "leave of unknown user 'ghost'"),
        (["join:bob", "link:bob"], "link:bob", "already linked"),
        (["join:bob"], "unlink:bob", "not linked"),
        (["join:bob", "link:bob"], "leave:bob", "while linked"),
        (["join:bob"], "message:bob", "message of user 'bob', who is not linked"),
        ([], "send:ghost", "send of unknown user 'ghost'"),
        (["join:bob", "link:bob"], "close:", "close while users are linked: bob"),
    ],
)
def test_an_event_that_cannot_follow_names_its_seq_and_changes_nothing(history, bad, message):
    ev = Events()

    def make(spec):
        kind, _, name = spec.partition(":")
        if kind == "close":
            return ev.close()
        if kind in ("message", "send"):
            return getattr(ev, kind)(name, {"type": "x/y"})
        return getattr(ev, kind)(name)

    events = stored([ev.listen(), *map(make, history), make(bad)])
    registry = rebuild(events[:-1])
    before = registry.copy()
    with pytest.raises(InconsistentEvent, match=f"seq {events[-1].seq}: .*{message}") as raised:
        apply(registry, events[-1])
    assert raised.value.seq == events[-1].seq
    assert registry == before


def test_events_before_listen_after_close_or_of_another_session_are_refused():
    ev = Events()
    with pytest.raises(InconsistentEvent, match="before any listen"):
        rebuild(stored([ev.join("bob")]))
    with pytest.raises(InconsistentEvent, match="after session 's1' closed"):
        rebuild(stored([ev.listen(), ev.close(), ev.join("bob")]))
    other = Events(session="s9")
    with pytest.raises(InconsistentEvent, match="session 's9' while session 's1' is current"):
        rebuild(stored([ev.listen(), other.join("bob")]))
    with pytest.raises(InconsistentEvent, match="lobby 'b' applied to lobby 'main'"):
        rebuild(stored([ev.listen(), Events(lobby="b").listen()]))


def test_out_of_order_seqs_are_refused():
    ev = Events()
    registry = rebuild([ev.listen().with_seq(5)])
    with pytest.raises(InconsistentEvent, match="seq 3: applied after seq 5"):
        apply(registry, ev.join("bob").with_seq(3))


def test_an_event_with_the_seq_last_applied_is_refused():
    """A seq already applied is out of order too: the same event fed twice must not be applied twice."""
    ev = Events()
    registry = rebuild([ev.listen().with_seq(5)])
    before = registry.copy()
    with pytest.raises(InconsistentEvent, match="seq 5: applied after seq 5: out of order"):
        apply(registry, ev.join("bob").with_seq(5))
    assert registry == before and registry.users == {}


def test_registries_differ_by_join_order():
    """Krmx promises join order, so two registries with the same users joined in another order are not equal
    (every rebuild == registry check relies on it)."""
    ev1, ev2 = Events(), Events()
    bob_first = rebuild(stored([ev1.listen(), ev1.join("bob"), ev1.join("alice")]))
    alice_first = rebuild(stored([ev2.listen(), ev2.join("alice"), ev2.join("bob")]))
    assert bob_first.users == alice_first.users  # as dicts: same users, same flags
    assert bob_first != alice_first
    assert bob_first == bob_first.copy()


def cutoff(username):
    return Cutoff(lobby="main", session="s1", at=1_800_000_000_000_000, connection="c1", reason="rate limit",
                  username=username)


def test_a_cutoff_names_a_linked_user_or_none():
    """A cut-off's username is the user its connection was linked to; naming an unknown or unlinked user is an
    inconsistent log (replay verify must catch it)."""
    ev = Events()
    registry = rebuild(stored([ev.listen(), ev.join("bob"), ev.join("alice"), ev.link("alice")]))
    apply(registry, cutoff(None).with_seq(5))  # a connection refused before it linked
    apply(registry, cutoff("alice").with_seq(6))
    assert registry.seq == 6
    for username, message in [("ghost", "cutoff of unknown user 'ghost'"),
                              ("bob", "cutoff of user 'bob', who is not linked")]:
        before = registry.copy()
        with pytest.raises(InconsistentEvent, match=f"seq 7: {message}"):
            apply(registry, cutoff(username).with_seq(7))
        assert registry == before


def test_recovery_unlinks_every_linked_user_of_a_session_that_never_closed():
    ev = Events()
    crashed = rebuild(
        stored([ev.listen(), ev.join("bob"), ev.join("alice"), ev.join("carol"), ev.link("carol"), ev.link("bob")])
    )
    assert crashed.needs_recovery
    recovery = recovery_events(crashed, session="s2", at=42)
    assert [(e.username, e.reason, e.session, e.at) for e in recovery] == [
        ("bob", "recovered", "s2", 42),
        ("carol", "recovered", "s2", 42),
    ]
    # Appended after the new session's listen, they bring the registry back to consistent.
    restarted = Events(session="s2")
    registry = crashed.copy()
    for event in [restarted.listen(), *recovery]:
        apply(registry, event)
    assert registry.linked() == []
    assert list(registry.users) == ["bob", "alice", "carol"]
    apply(registry, restarted.link("bob"))


def test_no_recovery_after_a_clean_close_or_an_empty_log():
    ev = Events()
    closed = rebuild(stored([ev.listen(), ev.join("bob"), ev.close()]))
    assert not closed.needs_recovery
    assert recovery_events(closed, session="s2", at=1) == []
    assert recovery_events(Registry(), session="s2", at=1) == []


# -- random valid histories ---------------------------------------------------------------------------------

NAMES = ["ann", "bob", "cy", "dee", "eve"]


@st.composite
def histories(draw):
    """A random valid log: sessions that close or crash, users joining, linking, messaging, leaving."""
    ev = Events()
    events = [ev.listen()]
    users: dict[str, bool] = {}
    sessions = 1
    for _ in range(draw(st.integers(0, 60))):
        name = draw(st.sampled_from(NAMES))
        action = draw(st.sampled_from(["join", "link", "unlink", "leave", "message", "broadcast", "restart"]))
        if action == "join" and name not in users:
            events.append(ev.join(name))
            users[name] = False
        elif action == "link" and users.get(name) is False:
            events.append(ev.link(name))
            users[name] = True
        elif action == "unlink" and users.get(name):
            events.append(ev.unlink(name, reason=draw(st.sampled_from(["requested", "dropped"]))))
            users[name] = False
        elif action == "leave" and name in users and not users[name]:
            events.append(ev.leave(name))
            del users[name]
        elif action == "message" and users.get(name):
            events.append(ev.message(name, {"type": "x/y", "payload": draw(st.integers(-(2**63), 2**64 - 1))}))
        elif action == "broadcast":
            events.append(ev.broadcast({"type": "x/z"}))
        elif action == "restart":
            crashed = draw(st.booleans())
            if not crashed:
                for user, linked in users.items():
                    if linked:
                        events.append(ev.unlink(user, reason="server restart"))
                        users[user] = False
                events.append(ev.close(reason="server restart"))
            sessions += 1
            ev.session = f"s{sessions}"
            events.append(ev.listen())
            if crashed:
                for user, linked in users.items():
                    if linked:
                        events.append(ev.unlink(user, reason="recovered"))
                        users[user] = False
    return stored(events), users


@settings(max_examples=200, deadline=None)
@given(histories())
def test_rebuild_equals_step_by_step_apply(history):
    events, expected_users = history
    step = Registry()
    for event in events:
        apply(step, event)
    assert rebuild(events) == step
    assert step.users == expected_users
    assert step.seq == len(events)


@settings(max_examples=50, deadline=None)
@given(histories(), st.data())
def test_load_registry_from_a_snapshot_equals_a_full_fold(history, data):
    """Resuming from a snapshot at any point gives the same registry as folding the whole log."""
    from events import EventStore

    events, _ = history
    with EventStore(":memory:") as store:
        store.append(events)
        cut = data.draw(st.integers(1, len(events)))
        store.save_snapshot(rebuild(events[:cut]))
        at = data.draw(st.integers(1, len(events)))
        assert store.load_registry("main", at) == rebuild(events[:at])
        assert store.load_registry("main") == rebuild(events)
