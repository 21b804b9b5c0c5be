"""``lobby replay html``: one self-contained HTML page for a session (no network needed to open it).

A swimlane per user shows when it was joined (thin bar) and linked (thick bar), with a mark and its reason
where it got unlinked or left (kick, dropped, ping timeout, recovered, server close, ...), ticks for its
custom messages (up: sent by the user, down: sent to it by the app) and, on a lane of its own, the app's
broadcasts. The swimlanes are SVG drawn here, so they show without scripts; beside them, a script renders
the event table from the events embedded in the page (filterable; a click on a row shows the registry after
that event and places a cursor on the lanes).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from html import escape

import orjson

from events import Event

from .index import registry_at
from .reader import ReplayError, check_output, format_duration, format_time, open_log, progress
from .render import event_detail, reason_label
from .sessions import SessionSummary, summarize

__all__ = ["html", "render_html", "Lane", "Segment", "Mark", "build_lanes"]

WIDTH = 640  # of the drawing area, in SVG units (about pixels, in a 1400-pixel-wide window)
LABEL = 100  # the name column
RIGHT = 130  # room for the labels of the last marks
LANE = 34  # height of one lane
TOP = 34  # room for the time axis
#: Colour of a mark by its reason; anything else is "other".
REASON_COLOURS = {
    "requested": "#6b7280",
    "dropped": "#dc2626",
    "ping timeout": "#ea580c",
    "frame too large": "#ea580c",
    "kick": "#9333ea",
    "close": "#2563eb",
    "server restart": "#2563eb",
    "server": "#2563eb",
    "recovered": "#0891b2",
    "ended without close": "#111827",
}
OTHER_COLOUR = "#b45309"


@dataclass
class Segment:
    """A stretch of a user's lane in one state: ``joined`` (unlinked) or ``linked``."""

    state: str
    start_seq: int
    start_at: int
    start_reason: str
    end_seq: int | None = None
    end_at: int | None = None
    end_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Mark:
    """An unlink, a leave or a session end on a lane, with its reason."""

    kind: str
    seq: int
    at: int
    reason: str


class Ticks:
    """Messages binned as they are read, one tick per pixel column and direction ("in": from the user, "out":
    to it): a session of millions of messages keeps a few thousand ticks, not every message."""

    def __init__(self, scale: _Scale) -> None:
        self.scale = scale
        #: (x, direction) -> [first seq, count, message types]
        self.columns: dict[tuple[int, str], list[Any]] = {}

    def add(self, seq: int, at: int, direction: str, message_type: str) -> None:
        key = (int(self.scale.x(seq, at)), direction)
        column = self.columns.get(key)
        if column is None:
            self.columns[key] = [seq, 1, {message_type}]
        else:
            column[1] += 1
            column[2].add(message_type)

    def __bool__(self) -> bool:
        return bool(self.columns)


@dataclass
class Lane:
    username: str
    ticks: Ticks
    segments: list[Segment] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)

    def open_segment(self) -> Segment | None:
        last = self.segments[-1] if self.segments else None
        return last if last is not None and last.end_seq is None else None


def _message_type(event: Event) -> str:
    message = getattr(event, "message", None)
    return message["type"] if isinstance(message, dict) and isinstance(message.get("type"), str) else "?"


def build_lanes(
    events: Iterable[Event], initial: dict[str, bool], summary: SessionSummary, scale: _Scale
) -> tuple[dict[str, Lane], Ticks]:
    """The lanes of a session (users in order of appearance) and its broadcasts' ticks."""
    lanes: dict[str, Lane] = {}
    broadcasts = Ticks(scale)

    def lane(name: str) -> Lane:
        found = lanes.get(name)
        if found is None:
            found = lanes[name] = Lane(name, Ticks(scale))
        return found

    def end(name: str, event: Event, reason: str) -> None:
        segment = lane(name).open_segment()
        if segment is not None:
            segment.end_seq, segment.end_at, segment.end_reason = event.seq, event.at, reason

    for name, linked in initial.items():
        lane(name).segments.append(
            Segment("linked" if linked else "joined", summary.first_seq, summary.start, "before this session")
        )
    for event in events:
        name = getattr(event, "username", None)
        seq, at = event.seq or 0, event.at
        if event.type == "join":
            lane(name).segments.append(Segment("joined", seq, at, "join"))  # type: ignore[arg-type]
        elif event.type == "link":
            end(name, event, "link")  # type: ignore[arg-type]
            lane(name).segments.append(Segment("linked", seq, at, "link"))  # type: ignore[arg-type]
        elif event.type == "unlink":
            reason = event.reason  # type: ignore[attr-defined]
            end(name, event, reason)  # type: ignore[arg-type]
            lane(name).marks.append(Mark("unlink", seq, at, reason))  # type: ignore[arg-type]
            lane(name).segments.append(Segment("joined", seq, at, reason))  # type: ignore[arg-type]
        elif event.type == "leave":
            reason = event.reason  # type: ignore[attr-defined]
            end(name, event, "left: " + reason)  # type: ignore[arg-type]
            lane(name).marks.append(Mark("leave", seq, at, reason))  # type: ignore[arg-type]
        elif event.type in ("message", "send"):
            lane(name).ticks.add(seq, at, "in" if event.type == "message" else "out", _message_type(event))  # type: ignore[arg-type]
        elif event.type == "broadcast":
            broadcasts.add(seq, at, "out", _message_type(event))
        elif event.type == "close":
            for other in lanes.values():
                segment = other.open_segment()
                if segment is not None:
                    segment.end_seq, segment.end_at, segment.end_reason = seq, at, "session closed"
    if summary.end is None:
        for other in lanes.values():
            segment = other.open_segment()
            if segment is not None:
                segment.end_seq, segment.end_at, segment.end_reason = summary.last_seq, summary.last_at, "ended without close"
                other.marks.append(Mark("end", summary.last_seq, summary.last_at, "ended without close"))
    return lanes, broadcasts


class _Scale:
    """x of a point of the session, by time or by seq."""

    def __init__(self, summary: SessionSummary, axis: str) -> None:
        end = summary.end if summary.end is not None else summary.last_at
        if axis == "auto":
            axis = "time" if end > summary.start else "seq"
        self.axis = axis
        self.low, self.high = (summary.start, end) if axis == "time" else (summary.first_seq, summary.last_seq)
        self.span = max(1, self.high - self.low)

    def x(self, seq: int, at: int) -> float:
        value = at if self.axis == "time" else seq
        return LABEL + (min(max(value, self.low), self.high) - self.low) / self.span * WIDTH

    def ticks(self) -> list[tuple[float, str]]:
        result = []
        for step in range(6):
            value = self.low + self.span * step / 5
            if self.axis == "seq":
                label = f"seq {round(value)}"
            else:
                label = format_time(int(value), date=False)
                label = label[:-4] if self.span >= 60_000_000 else label
            result.append((LABEL + WIDTH * step / 5, label))
        return result


def _colour(reason: str) -> str:
    return REASON_COLOURS.get(reason, OTHER_COLOUR)


def _svg(lanes: dict[str, Lane], broadcasts: Ticks, scale: _Scale) -> str:
    rows = len(lanes) + (1 if broadcasts else 0)
    height = TOP + rows * LANE + 10
    out = [
        f'<svg id="lanes" viewBox="0 0 {LABEL + WIDTH + RIGHT} {height}" '
        f'width="100%" role="img" aria-label="swimlanes: one per user" data-axis="{scale.axis}">'
    ]
    for x, label in scale.ticks():
        out.append(f'<line class="tick" x1="{x:.1f}" y1="{TOP - 6}" x2="{x:.1f}" y2="{height - 10}"/>')
        out.append(f'<text class="tick-label" x="{x:.1f}" y="{TOP - 12}">{escape(label)}</text>')
    row = 0
    if broadcasts:
        y = TOP + LANE / 2
        out.append(f'<g class="lane broadcasts"><text class="name" x="4" y="{y + 4:.1f}">(broadcasts)</text>')
        out.extend(_ticks(broadcasts, y, "broadcast"))
        out.append("</g>")
        row = 1
    for name, lane in lanes.items():
        y = TOP + (row + 0.5) * LANE
        row += 1
        out.append(f'<g class="lane" data-user="{escape(name)}">')
        out.append(f'<rect class="lane-bg" x="0" y="{y - LANE / 2:.1f}" width="{LABEL + WIDTH + RIGHT}" height="{LANE}"/>')
        out.append(f'<text class="name" x="4" y="{y + 4:.1f}">{escape(name)}</text>')
        for segment in lane.segments:
            start = scale.x(segment.start_seq, segment.start_at)
            stop = scale.x(segment.end_seq or segment.start_seq, segment.end_at or segment.start_at)
            thick = 12 if segment.state == "linked" else 4
            title = (
                f"{name} {segment.state} from seq {segment.start_seq} ({segment.start_reason}, "
                f"{format_time(segment.start_at)}) to seq {segment.end_seq} ({segment.end_reason}, "
                f"{format_time(segment.end_at)})"
            )
            out.append(
                f'<rect class="seg {segment.state}" x="{start:.1f}" y="{y - thick / 2:.1f}" '
                f'width="{max(1.5, stop - start):.1f}" height="{thick}" data-from-seq="{segment.start_seq}" '
                f'data-to-seq="{segment.end_seq}" data-start-reason="{escape(segment.start_reason)}" '
                f'data-end-reason="{escape(segment.end_reason or "")}"><title>{escape(title)}</title></rect>'
            )
        out.extend(_ticks(lane.ticks, y, "message"))
        last_label = -1e9
        for mark in lane.marks:
            x = scale.x(mark.seq, mark.at)
            colour = _colour(mark.reason)
            label = reason_label(mark.reason)
            title = f"{mark.kind} of {name} at seq {mark.seq}, {format_time(mark.at)}: {label}"
            if mark.kind == "unlink":
                shape = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{colour}"/>'
            elif mark.kind == "leave":
                shape = f'<path d="M{x - 4:.1f} {y - 4:.1f} l8 8 m0 -8 l-8 8" stroke="{colour}" stroke-width="2.5"/>'
            else:  # the session ended here without close
                shape = f'<rect x="{x - 1.5:.1f}" y="{y - 9:.1f}" width="3" height="18" fill="{colour}"/>'

            out.append(
                f'<g class="mark {mark.kind}" data-seq="{mark.seq}" data-reason="{escape(mark.reason)}">'
                f"<title>{escape(title)}</title>{shape}"
            )
            if x - last_label > 70:
                out.append(f'<text class="reason" x="{x + 5:.1f}" y="{y + 15:.1f}" fill="{colour}">{escape(label)}</text>')
                last_label = x
            out.append("</g>")
        out.append("</g>")
    out.append(f'<line id="cursor" x1="0" y1="{TOP - 6}" x2="0" y2="{height - 10}" visibility="hidden"/>')
    out.append("</svg>")
    return "\n".join(out)


def _ticks(ticks: Ticks, y: float, kind: str) -> list[str]:
    """Message ticks, one per pixel column and direction (a busy lane stays small): up from the user, down to it."""
    out = []
    for (x, direction), (first, count, found_types) in ticks.columns.items():
        top, bottom = (y - 15, y - 8) if direction == "in" else (y + 8, y + 15)
        if kind == "broadcast":
            top, bottom = y - 7, y + 7
        types = sorted(found_types)
        what = {"message": "from the user" if direction == "in" else "to the user", "broadcast": "broadcast"}[kind]
        title = f"{count} message{'s' if count > 1 else ''} {what} ({', '.join(types[:5])}) at seq {first}"
        out.append(
            f'<line class="msg {direction} {kind}" x1="{x}.5" y1="{top:.1f}" x2="{x}.5" y2="{bottom:.1f}" '
            f'data-seq="{first}" data-count="{count}"><title>{escape(title)}</title></line>'
        )
    return out


def _legend() -> str:
    items = [
        '<span><svg width="26" height="12"><rect y="4" width="26" height="4" class="seg joined"/></svg> joined, unlinked</span>',
        '<span><svg width="26" height="12"><rect width="26" height="12" class="seg linked"/></svg> linked</span>',
        '<span><svg width="12" height="12"><line x1="6" y1="0" x2="6" y2="12" class="msg in"/></svg> message from / to the user</span>',
    ]
    for reason in ("requested", "dropped", "ping timeout", "kick", "recovered", "close"):
        items.append(
            f'<span><svg width="12" height="12"><circle cx="6" cy="6" r="5" fill="{_colour(reason)}"/></svg> '
            f"{escape(reason_label(reason))}</span>"
        )
    items.append('<span><svg width="12" height="12"><path d="M2 2 l8 8 m0 -8 l-8 8" stroke="#555" stroke-width="2.5"/>'
                 "</svg> left (kick, requested, server close)</span>")
    items.append(f'<span><svg width="6" height="14"><rect x="1.5" width="3" height="14" '
                 f'fill="{_colour("ended without close")}"/></svg> ended without close (a crash)</span>')
    return '<div class="legend">' + "".join(items) + "</div>"


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:16px;color:#111827;background:#fff}
h1{font-size:18px;margin:0 0 4px}.meta{color:#4b5563;margin-bottom:8px}.meta b{color:#111827}
.layout{display:flex;gap:16px;align-items:flex-start}.lanes-panel{flex:3;min-width:0}
.table-panel{flex:2;min-width:0;max-height:88vh;overflow:auto;border:1px solid #e5e7eb}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12px;color:#374151;margin:6px 0 10px}
.legend span{display:inline-flex;align-items:center;gap:4px}
.seg.linked{fill:#16a34a}.seg.joined{fill:#cbd5e1}.lane-bg{fill:transparent}.lane:hover .lane-bg{fill:#f3f4f6}
.lane.selected .lane-bg{fill:#fef9c3}.name{font-size:13px;font-weight:600;cursor:pointer}
.tick{stroke:#e5e7eb}.tick-label{font-size:11px;fill:#6b7280;text-anchor:middle}
.msg{stroke:#1f2937;stroke-width:1}.msg.broadcast{stroke:#7c3aed}.reason{font-size:10px}
#cursor{stroke:#f59e0b;stroke-width:2}
table{border-collapse:collapse;width:100%;font-size:12px}th{position:sticky;top:0;background:#f9fafb;text-align:left}
td,th{padding:2px 6px;border-bottom:1px solid #f3f4f6;white-space:nowrap}td.detail{white-space:normal}
tr.sel{background:#fef3c7}tbody tr{cursor:pointer}tbody tr:hover{background:#f3f4f6}
.controls{display:flex;gap:8px;align-items:center;padding:6px;position:sticky;top:0;background:#fff}
#registry{font-size:12px;padding:6px;border-bottom:1px solid #e5e7eb}.t-unlink,.t-leave{color:#b91c1c}
.t-link,.t-join{color:#15803d}.t-close,.t-listen{color:#1d4ed8}
"""

_JS = r"""
(function () {
  var data = JSON.parse(document.getElementById('session-data').textContent);
  var events = data.events, body = document.getElementById('event-rows');
  var filter = document.getElementById('filter'), count = document.getElementById('count');
  var cursor = document.getElementById('cursor'), registryBox = document.getElementById('registry');
  function detail(e) { return e.detail || ''; }
  function render() {
    var needle = filter.value.trim().toLowerCase(), shown = 0, rows = [];
    for (var i = 0; i < events.length; i++) {
      var e = events[i];
      var text = (e.type + ' ' + (e.username || '') + ' ' + detail(e)).toLowerCase();
      if (needle && text.indexOf(needle) < 0) continue;
      shown++;
      rows.push('<tr data-index="' + i + '"><td>' + e.seq + '</td><td>' + e.time + '</td><td class="t-' + e.type +
        '">' + e.type + '</td><td>' + esc(e.username || '') + '</td><td class="detail">' + esc(detail(e)) + '</td></tr>');
    }
    body.innerHTML = rows.join('');
    count.textContent = 'showing ' + shown + ' of ' + events.length + ' events' +
      (data.truncated ? ' (the first ' + events.length + ' of ' + data.total + ')' : '');
  }
  function esc(s) { return String(s).replace(/[&<>"]/g, function (c) { return {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]; }); }
  function registryAfter(index) {
    var users = {}, order = [];
    data.initial.forEach(function (u) { users[u[0]] = u[1]; order.push(u[0]); });
    for (var i = 0; i <= index; i++) {
      var e = events[i], n = e.username;
      if (e.type === 'join') { users[n] = false; order.push(n); }
      else if (e.type === 'link') users[n] = true;
      else if (e.type === 'unlink') users[n] = false;
      else if (e.type === 'leave') { delete users[n]; order = order.filter(function (o) { return o !== n; }); }
    }
    return order.map(function (n) { return (users[n] ? '\u25cf ' : '\u25cb ') + n; });
  }
  body.addEventListener('click', function (ev) {
    var row = ev.target.closest('tr'); if (!row) return;
    var index = +row.getAttribute('data-index'), e = events[index];
    Array.prototype.forEach.call(body.querySelectorAll('tr.sel'), function (r) { r.classList.remove('sel'); });
    row.classList.add('sel');
    var users = registryAfter(index);
    registryBox.textContent = 'after seq ' + e.seq + ': ' + (users.length ? users.join('  ') : '(no users)');
    cursor.setAttribute('x1', e.x); cursor.setAttribute('x2', e.x); cursor.setAttribute('visibility', 'visible');
  });
  filter.addEventListener('input', render);
  Array.prototype.forEach.call(document.querySelectorAll('#lanes .lane[data-user] .name'), function (label) {
    label.addEventListener('click', function () {
      var lane = label.parentNode, user = lane.getAttribute('data-user');
      var on = !lane.classList.contains('selected');
      Array.prototype.forEach.call(document.querySelectorAll('#lanes .lane.selected'), function (l) { l.classList.remove('selected'); });
      if (on) lane.classList.add('selected');
      filter.value = on ? user : ''; render();
    });
  });
  render();
  document.body.setAttribute('data-rendered', 'yes');
})();
"""


def render_html(
    summary: SessionSummary,
    events: Iterable[Event],
    initial: dict[str, bool],
    *,
    axis: str = "auto",
    max_rows: int = 20_000,
) -> str:
    """The page of a session from its events (read once: only the table's first ``max_rows`` are kept, so a
    session of millions of events does not fill memory) and the registry it started with."""
    kept: list[Event] = []
    total = 0

    def keeping(events: Iterable[Event]) -> Iterator[Event]:
        nonlocal total
        for event in events:
            if total < max_rows:
                kept.append(event)
            total += 1
            yield event

    scale = _Scale(summary, axis)
    lanes, broadcasts = build_lanes(keeping(events), initial, summary, scale)
    rows = [
        {
            "seq": event.seq, "time": format_time(event.at), "type": event.type,
            "username": getattr(event, "username", None), "detail": event_detail(event),
            "x": round(scale.x(event.seq or 0, event.at), 1),
        }
        for event in kept
    ]
    data = {"initial": list(initial.items()), "events": rows, "total": total, "truncated": total > max_rows}
    # Every "<" escaped: "</script>" would end the element, and "<!--<script>" would swallow the page's script.
    embedded = orjson.dumps(data).decode().replace("<", "\\u003c")
    end = format_time(summary.end) if summary.end is not None else f"{summary.status} (last event {format_time(summary.last_at)})"
    counts = ", ".join(f"{kind} {count}" for kind, count in summary.counts.items())
    title = f"{summary.lobby} / {summary.session}"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>krmx-lobby session {escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>Session {escape(summary.session)} <small>of lobby {escape(summary.lobby)}</small></h1>
<div class="meta"><b>{escape(format_time(summary.start))}</b> &rarr; <b>{escape(end)}</b> &middot;
{escape(format_duration(summary.duration))} &middot; seqs {summary.first_seq}..{summary.last_seq} &middot;
{len(lanes)} users &middot; {summary.events} events ({escape(counts)}) &middot; axis: {scale.axis}</div>
{_legend()}
<div class="layout">
<div class="lanes-panel">
{_svg(lanes, broadcasts, scale)}
</div>
<div class="table-panel">
<div class="controls"><input id="filter" type="search" placeholder="filter: user, type, reason" size="28">
<span id="count"></span></div>
<div id="registry">click an event to see the registry after it</div>
<table><thead><tr><th>seq</th><th>time (UTC)</th><th>type</th><th>user</th><th>detail</th></tr></thead>
<tbody id="event-rows"></tbody></table>
<noscript>The event table needs JavaScript; the swimlanes do not.</noscript>
</div>
</div>
<script id="session-data" type="application/json">{embedded}</script>
<script>{_JS}</script>
</body>
</html>
"""


def html(
    path: str | os.PathLike[str],
    session: str | None = None,
    *,
    lobby: str | None = None,
    output: str | os.PathLike[str] | None = None,
    axis: str = "auto",
    max_rows: int = 20_000,
) -> str:
    """The HTML page of ``session`` (default: the last one); written to ``output`` too when given.
    ``axis``: ``time``, ``seq`` or ``auto`` (time, unless every event has the same time)."""
    if axis not in ("auto", "time", "seq"):
        raise ReplayError(f"axis must be auto, time or seq, not {axis!r}")
    if output is not None:
        check_output(path, output)
    with open_log(path) as log:
        info = log.session(session, lobby)
        summary = summarize(log, info)
        initial = registry_at(log, info.lobby, info.first_seq - 1).users
        total = summary.last_seq - summary.first_seq + 1
        events = progress(log.session_events(info), total=total, description="reading the session")
        page = render_html(summary, events, dict(initial), axis=axis, max_rows=max_rows)
    if output is not None:
        with open(output, "w", encoding="utf-8") as handle:
            handle.write(page)
    return page

