"""``lobby replay verify``: fold the whole log and report every inconsistency with its seq.

Checked: seqs are gapless; every event can follow its lobby's registry (a link needs a join, a leave needs
the user unlinked first, messages need a linked user, nothing before listen or after close, ...); every
session closes; after a session that never closed, the next one starts with exactly the recovery unlinks
(reason ``recovered``) of the users that were linked, and ``recovered`` appears nowhere else; a lobby's time
never goes back (time queries search the log by time). The derived data other commands trust is checked
against the fold too: each registry snapshot equals the registry at its seq, and the sessions table gives each
session the seqs its events have.

The fold goes on after a problem as if the event had happened (a link without a join links the user), so
one bad event is reported once and does not hide the ones after it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from events import Event, EventLogError, InconsistentEvent, Registry, apply

from .reader import Log, SessionRange, format_time, open_log, progress

__all__ = ["Problem", "VerifyReport", "verify", "verify_log"]


@dataclass(frozen=True, slots=True)
class Problem:
    seq: int
    kind: str
    message: str
    lobby: str | None = None
    session: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "lobby": self.lobby, "session": self.session,
                "message": self.message}


@dataclass
class VerifyReport:
    path: str
    events: int = 0
    last_seq: int = 0
    sessions: int = 0
    problems: list[Problem] = field(default_factory=list)
    #: Sessions without close taken as still running (``live``): not problems, only noted.
    running: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "events": self.events, "last_seq": self.last_seq,
                "sessions": self.sessions, "running": self.running,
                "problems": [p.to_dict() for p in self.problems]}


class _Lobby:
    """The verifier's view of one lobby: its registry and the recovery it expects after a crash."""

    def __init__(self) -> None:
        self.registry = Registry()
        #: Users a restart must unlink (reason recovered), in join order, while its recovery is under way.
        self.expected: list[str] | None = None
        self.recovered: list[str] = []
        self.restart_seq = 0
        self.last_at = 0
        self.last_seq = 0
        #: The fold went on past a problem as if the event had happened (a guess): snapshots are not compared.
        self.guessed = False
        #: The session whose events after its close were reported (once).
        self.after_close: str | None = None


def _kind(registry: Registry, event: Event) -> str:
    if event.type != "listen":
        if registry.session is None:
            return "before-listen"
        if event.session != registry.session:
            return "other-session"
        if registry.closed:
            return "after-close"
    linked = registry.users.get(getattr(event, "username", None) or "")
    if event.type == "join":
        return "join-of-existing-user"
    if event.type == "link":
        return "link-without-join" if linked is None else "link-while-linked"
    if event.type == "leave":
        return "leave-of-unknown-user" if linked is None else "leave-while-linked"
    if event.type in ("unlink", "message", "send"):
        return f"{event.type}-of-unknown-user" if linked is None else f"{event.type}-while-unlinked"
    if event.type == "close":
        return "close-while-linked"
    return "inconsistent"


_MESSAGES = {
    "link-without-join": "link of {user}, who never joined (a link without a join)",
    "leave-while-linked": "leave of {user} while linked, without an unlink before it",
}


def _force(registry: Registry, event: Event, current: SessionRange | None) -> None:
    """Apply ``event`` as if it could follow: what the log says happened, happened. An event of another
    session that comes after the end of the current one (by the sessions table: its listen was lost) starts
    that session as a listen would, so it is reported once, not at each of its events; a stray event of
    another session in the middle of the current one does not."""
    username = getattr(event, "username", None)
    users = registry.users
    if event.type != "listen" and event.session != registry.session:
        if current is None or (event.seq or 0) > current.last_seq:
            registry.session, registry.closed = event.session, False
    if event.type == "listen":
        registry.session, registry.closed = event.session, False
    elif event.type == "join":
        users.setdefault(username, False)  # type: ignore[arg-type]
    elif event.type == "link":
        users[username] = True  # type: ignore[index]
    elif event.type == "unlink" and username in users:
        users[username] = False  # type: ignore[index]
    elif event.type == "leave":
        users.pop(username, None)  # type: ignore[arg-type]
    elif event.type == "close":
        registry.closed = True
    registry.lobby = event.lobby
    registry.seq = max(registry.seq or 0, event.seq or 0)


class _Verifier:
    def __init__(self, log: Log, live: bool) -> None:
        self.log, self.live = log, live
        self.lobbies: dict[str, _Lobby] = {}
        self.report = VerifyReport(path=log.path, last_seq=log.upto, sessions=len(log.sessions))
        #: Each session's place by the sessions table.
        self.ranges = {(info.lobby, info.session): info for info in log.sessions}

    def problem(self, seq: int, kind: str, message: str, event: Event | None = None, lobby: str | None = None,
                session: str | None = None) -> None:
        if event is not None:
            lobby, session = event.lobby, event.session
        self.report.problems.append(Problem(seq, kind, message, lobby, session))

    def run(self) -> VerifyReport:
        previous = 0
        snapshots = self._snapshots()
        spans: dict[tuple[str, str], list[int]] = {}
        for event in progress(self.log.read(), total=self.log.upto, description="verifying"):
            seq = event.seq or 0
            if seq != previous + 1:
                missing = f"seq {previous + 1}" if seq == previous + 2 else f"seqs {previous + 1}..{seq - 1}"
                self.problem(seq, "seq-gap", f"seq gap: {missing} missing before seq {seq}", event)
            previous = seq
            self.report.events += 1
            lobby = self.lobbies.setdefault(event.lobby, _Lobby())
            self.event(lobby, event)
            spans.setdefault((event.lobby, event.session), [seq, seq])[1] = seq
            if (event.lobby, seq) in snapshots:
                self.check_snapshot(lobby, event)
        self.check_sessions(spans)
        for name, lobby in self.lobbies.items():
            self.end_recovery(lobby, None)
            registry = lobby.registry
            if registry.session is not None and not registry.closed:
                if self.live:
                    self.report.running.append(f"{name}/{registry.session}")
                else:
                    self.problem(
                        registry.seq or 0, "never-closed",
                        f"session {registry.session} has no close after its last event (seq {registry.seq}): "
                        "the server crashed, or still runs (verify --live takes the last session as running)",
                        lobby=name, session=registry.session,
                    )
        return self.report

    def event(self, lobby: _Lobby, event: Event) -> None:
        registry = lobby.registry
        if event.at < lobby.last_at:
            self.problem(
                event.seq or 0, "time-goes-back",
                f"time goes back: {format_time(event.at)} is before {format_time(lobby.last_at)} of seq "
                f"{lobby.last_seq} (the system clock stepped back); time queries (--since, --until, --at-time) "
                "assume a lobby's time never decreases and may miss events here", event,
            )
        lobby.last_at, lobby.last_seq = event.at, event.seq or 0
        is_recovery = event.type == "unlink" and getattr(event, "reason", None) == "recovered"
        if lobby.expected is not None and not (is_recovery and event.session == registry.session):
            self.end_recovery(lobby, event)
        if event.type == "listen" and registry.session is not None and not registry.closed:
            self.problem(
                registry.seq or event.seq or 0, "never-closed",
                f"session {registry.session} never closed: it ended without close at seq {registry.seq} "
                f"(a crash) and restarted as session {event.session} at seq {event.seq}",
                lobby=event.lobby, session=registry.session,
            )
            lobby.expected, lobby.recovered, lobby.restart_seq = registry.linked(), [], event.seq or 0
        elif is_recovery:
            if lobby.expected is None:
                self.problem(event.seq or 0, "recovery-mismatch",
                             f"unlink of {event.username} with reason recovered, but no crashed session "  # type: ignore[attr-defined]
                             "is being recovered here (recovery comes right after the listen of a restart)", event)
            else:
                lobby.recovered.append(event.username)  # type: ignore[attr-defined]
        try:
            apply(registry, event)
        except InconsistentEvent as error:
            kind = _kind(registry, event)
            text = str(error).split(": ", 1)[-1]
            template = _MESSAGES.get(kind)
            if template is not None:
                text = template.format(user=getattr(event, "username", None))
            if kind != "after-close" or lobby.after_close != event.session:  # a session going on: said once
                self.problem(event.seq or 0, kind, text, event)
            if kind == "after-close":
                lobby.after_close = event.session
            lobby.guessed = True
            _force(registry, event, self.ranges.get((event.lobby, registry.session or "")))

    def _snapshots(self) -> set[tuple[str, int]]:
        db = self.log.store.db
        if "snapshots" not in db.table_names():
            return set()
        return set(db.execute("SELECT lobby, seq FROM snapshots WHERE seq <= ?", [self.log.upto]).fetchall())

    def check_snapshot(self, lobby: _Lobby, event: Event) -> None:
        """The snapshot at this event (``state`` and start-up begin there) must be the fold's registry; once the
        fold of its lobby went on past a problem by a guess, it is not compared."""
        if lobby.guessed:
            return
        seq = event.seq or 0
        try:
            saved = self.log.store.read_snapshot(event.lobby, seq)
        except EventLogError as error:
            self.problem(seq, "bad-snapshot", str(error).removeprefix(f"{self.log.store.path}: "), event)
            return
        if saved is None:
            return
        folded = lobby.registry
        if (list(saved.users.items()), saved.session, saved.closed) != (
            list(folded.users.items()), folded.session, folded.closed
        ):
            self.problem(
                seq, "bad-snapshot",
                f"the registry snapshot at seq {seq} is not the fold of the log there "
                f"({len(saved.users)} users, {len(saved.linked())} linked, against {len(folded.users)} and "
                f"{len(folded.linked())}): `state` and the next start would begin from it", event,
            )

    def check_sessions(self, spans: dict[tuple[str, str], list[int]]) -> None:
        """The sessions table (what `sessions`, `-s` and time queries use) must list each session with the seqs
        of its events."""
        for key, (first, last) in spans.items():
            info = self.ranges.get(key)
            if info is None:
                self.problem(
                    first, "bad-session-index",
                    f"session {key[1]} has events (seqs {first}..{last}) that the sessions table does not cover: "
                    "`sessions` and -s do not find them", lobby=key[0], session=key[1],
                )
            elif (first, last) != (info.first_seq, info.last_seq):
                self.problem(
                    info.first_seq, "bad-session-index",
                    f"the sessions table gives session {info.session} seqs {info.first_seq}..{info.last_seq}, but "
                    f"its events are seqs {first}..{last}", lobby=info.lobby, session=info.session,
                )

    def end_recovery(self, lobby: _Lobby, after: Event | None) -> None:
        """The recovery of a restart is over: it must have unlinked exactly the users linked at the crash."""
        expected, got = lobby.expected, lobby.recovered
        lobby.expected = None
        if expected is None or expected == got:
            return
        lobby.guessed = True
        missing = [name for name in expected if name not in got]
        for name in missing:  # as if recovered, so their next link is not reported again
            if name in lobby.registry.users:
                lobby.registry.users[name] = False
        extra = [name for name in got if name not in expected]
        parts = []
        if missing:
            parts.append(f"not unlinked (still linked from the crashed session): {', '.join(missing)}")
        if extra:
            parts.append(f"unlinked but were not linked: {', '.join(extra)}")
        if not parts:
            parts.append(f"unlinked in the order {', '.join(got)} instead of join order {', '.join(expected)}")
        seq = after.seq if after is not None and after.seq is not None else lobby.registry.seq or lobby.restart_seq
        self.problem(
            seq, "recovery-mismatch",
            f"the recovery after the restart at seq {lobby.restart_seq} does not match: " + "; ".join(parts),
            lobby=lobby.registry.lobby, session=lobby.registry.session,
        )


def verify_log(log: Log, *, live: bool = False) -> VerifyReport:
    return _Verifier(log, live).run()


def verify(path: str | os.PathLike[str], *, live: bool = False) -> VerifyReport:
    """Fold the whole log at ``path`` and report every inconsistency with its seq (``report.ok`` when none).
    With ``live``, the last session of each lobby may still be running: no close there is not a problem."""
    with open_log(path) as log:
        return verify_log(log, live=live)
