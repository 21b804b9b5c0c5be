"""replay html: one self-contained page per session, checked as HTML and in a real headless Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser

import orjson
import pytest

import replay
from lobby.cli import main
from replay.html import render_html
from replay.reader import open_log
from replay.sessions import summarize

from events import EventStore

from .factories import Events
from .replay_logs import crash_log, game_log  # noqa: F401 - fixtures


class Page(HTMLParser):
    """What the tests look at: external references, lanes, segments, marks, and text."""

    def __init__(self) -> None:
        super().__init__()
        self.references: list[str] = []
        self.lanes: list[str] = []
        self.segments: list[dict] = []
        self.marks: list[dict] = []
        self.rows: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        data = dict(attrs)
        self.tags.append(tag)
        for name in ("src", "href", "action", "data", "poster"):
            if data.get(name):
                self.references.append(data[name])
        if tag == "link":
            self.references.append(str(data))
        classes = (data.get("class") or "").split()
        if "lane" in classes and "data-user" in data:
            self.lanes.append(data["data-user"])
        if "seg" in classes and self.lanes:  # (the legend, before the lanes, has samples)
            self.segments.append({"lane": self.lanes[-1], "state": classes[1], **data})
        if "mark" in classes and self.lanes:
            self.marks.append({"lane": self.lanes[-1], "kind": classes[1], "reason": data["data-reason"]})
        if tag == "tr" and "data-index" in data:
            self.rows.append(data["data-index"])


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


def test_the_page_is_self_contained_with_a_lane_per_user_and_reasons(game_log, tmp_path):
    first = replay.sessions(game_log)[0]
    text = replay.html(game_log, first.session, output=tmp_path / "s.html")
    assert (tmp_path / "s.html").read_text() == text
    page = parse(text)
    assert page.references == []
    assert "http" not in text and "url(" not in text and "@import" not in text
    assert page.lanes == ["alice", "bob", "carol", "dave"]
    bob = [(s["state"], s["data-from-seq"], s["data-to-seq"], s["data-end-reason"]) for s in page.segments
           if s["lane"] == "bob"]
    assert bob == [
        ("joined", "4", "5", "link"), ("linked", "5", "12", "dropped"), ("joined", "12", "13", "link"),
        ("linked", "13", "25", "server restart"), ("joined", "25", "26", "session closed"),
    ]
    marks = {(m["lane"], m["kind"], m["reason"]) for m in page.marks}
    assert {("bob", "unlink", "dropped"), ("carol", "leave", "kick"), ("dave", "unlink", "invalid message"),
            ("dave", "leave", "requested"), ("alice", "unlink", "server restart")} <= marks
    assert 'class="msg in message"' in text and 'class="msg out message"' in text and "broadcast" in text
    assert page.rows == []  # the event table is the script's work


def test_the_table_keeps_max_rows_events_and_the_lanes_every_event(game_log):
    """The page reads the session once; only the table's first max_rows events are kept (a session of
    millions of events does not fill memory), while the lanes still show all of them."""
    first = replay.sessions(game_log)[0]
    text = replay.html(game_log, first.session, max_rows=3)
    data = orjson.loads(text.split('<script id="session-data" type="application/json">')[1].split("</script>")[0])
    assert [row["seq"] for row in data["events"]] == [first.first_seq, first.first_seq + 1, first.first_seq + 2]
    assert (data["total"], data["truncated"]) == (first.last_seq - first.first_seq + 1, True)
    assert parse(text).lanes == ["alice", "bob", "carol", "dave"]
    with open_log(game_log) as log:  # the events as a one-pass iterator, as html() reads them
        info = log.session(first.session)
        assert render_html(summarize(log, info), iter(list(log.session_events(info))), {}, max_rows=3) == text


def test_what_players_wrote_cannot_end_or_hide_the_pages_script(tmp_path):
    """A chat line with "<!--<script>" put the HTML parser in its double-escaped state, and the page's own script
    was never run (no table); "</script>" would end the data early. Every "<" of the data is escaped."""
    ev = Events()
    db = tmp_path / "lobby.db"
    said = ["hi <!--<script> there", "</script><script>alert(1)</script>", "a < b <!-- c"]
    with EventStore(db) as store:
        store.append([ev.listen(), ev.join("eve"), ev.link("eve"),
                      *(ev.message("eve", {"type": "chat/say", "payload": text}) for text in said), ev.close()])
    text = replay.html(db, "s1")
    embedded = text.split('<script id="session-data" type="application/json">')[1].split("</script>")[0]
    assert "<" not in embedded
    details = [row["detail"] for row in orjson.loads(embedded)["events"] if row["type"] == "message"]
    assert len(details) == 3 and all(line in detail for line, detail in zip(said, details)), details


def test_a_crashed_session_ends_its_lanes_and_the_restart_shows_recovered(crash_log):
    db, _ = crash_log
    crashed, restarted = replay.sessions(db)
    page = parse(replay.html(db, crashed.session))
    assert page.lanes == ["alice", "bob"]
    assert {(m["lane"], m["kind"], m["reason"]) for m in page.marks} == {
        ("alice", "end", "ended without close"), ("bob", "end", "ended without close"),
    }
    page = parse(replay.html(db, restarted.session))
    linked_before = [s for s in page.segments if s["data-start-reason"] == "before this session"]
    assert [(s["lane"], s["state"], s["data-end-reason"]) for s in linked_before] == [
        ("alice", "linked", "recovered"), ("bob", "linked", "recovered"),
    ]
    assert ("alice", "leave", "close") in {(m["lane"], m["kind"], m["reason"]) for m in page.marks}
    assert "server close" in replay.html(db, restarted.session)


def test_the_command_writes_the_file(game_log, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    last = replay.sessions(game_log)[-1].session
    assert main(["replay", "html", str(game_log)]) == 0
    assert f"wrote session-{last}.html" in capsys.readouterr().err
    assert parse((tmp_path / f"session-{last}.html").read_text()).lanes == ["alice", "bob"]
    assert main(["replay", "html", str(game_log), "-o", "-", "--axis", "seq"]) == 0
    assert 'data-axis="seq"' in capsys.readouterr().out


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="needs chromium (apt-get install -y chromium); .ci/run installs it, so CI never skips this",
)
def test_a_headless_browser_renders_the_event_table_offline(game_log, tmp_path):
    assert CHROMIUM, "chromium is needed: apt-get install -y chromium"
    first = replay.sessions(game_log)[0]
    page_file = tmp_path / "session.html"
    replay.html(game_log, first.session, output=page_file)
    profile = tmp_path / "profile"
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--virtual-time-budget=2000",
    ]
    dom = subprocess.run([*command, "--dump-dom", page_file.as_uri()], capture_output=True, text=True, timeout=90,
                         check=True).stdout
    rendered = parse(dom)
    assert 'data-rendered="yes"' in dom  # the script ran to its end without an error
    assert rendered.rows == [str(i) for i in range(first.events)]
    assert f"showing {first.events} of {first.events} events" in dom
    assert rendered.lanes == ["alice", "bob", "carol", "dave"]
    shot = tmp_path / "shot.png"
    subprocess.run([*command, f"--screenshot={shot}", "--window-size=1400,900", page_file.as_uri()],
                   capture_output=True, timeout=90, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_message_ticks_are_binned_as_read_and_count_every_message(tmp_path):
    """Each message was kept until the page was drawn (724 MB for a session of 3 million events): now the
    lanes keep one tick per pixel column and direction, with its count, its first seq and its types."""
    import re

    import importlib

    replay_html = importlib.import_module("replay.html")

    ev = Events()
    db = tmp_path / "busy.db"
    chatter = [ev.message("eve", {"type": f"chat/{i % 3}", "payload": i}) for i in range(3000)]
    answers = [ev.send("eve", {"type": "chat/ok"}) for _ in range(1000)]
    with EventStore(db) as store:
        store.append([ev.listen(), ev.join("eve"), ev.link("eve"), *chatter, *answers,
                      ev.broadcast({"type": "news"}), ev.close()])
    with open_log(db) as log:
        summary = summarize(log, log.sessions[0])
        scale = replay_html._Scale(summary, "seq")
        lanes, broadcasts = replay_html.build_lanes(log.read(), {}, summary, scale)
    columns = lanes["eve"].ticks.columns
    assert len(columns) <= 2 * (replay_html.WIDTH + 1) < 4000
    assert sum(count for _, count, _ in columns.values()) == 4000
    assert set().union(*(types for _, _, types in columns.values())) == {"chat/0", "chat/1", "chat/2", "chat/ok"}
    assert min(first for first, _, _ in columns.values()) == 4  # the first message's seq
    assert [count for _, count, _ in broadcasts.columns.values()] == [1]
    text = replay.html(db, "s1")
    counts = [int(n) for n in re.findall(r'class="msg (?:in|out) message"[^>]*data-count="(\d+)"', text)]
    assert sum(counts) == 4000
