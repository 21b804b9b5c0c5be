"""The Krmx conformance app (../shared/conformance/README.md, section 3) on the public API.

    python -m examples.conformance --port PORT [--no-new-users] [--prejoin NAME]... [--db PATH]

Without ``--db`` the log goes to a fresh temporary folder, removed at exit: the suite starts one server per
test and expects it empty. SIGTERM closes the server the Krmx way and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from lobby import Server, ServerError
from lobby.server import run_event_loop
from lobby.logs import configure_logging

SLOW_AUTH_DELAY_S = 0.1


def build(server: Server) -> Server:
    """Register the conformance app's listeners on ``server``."""

    @server.on("authenticate")
    def authenticate(username: str, info: Any) -> Any:
        def decide() -> None:
            if username.startswith("deny"):
                raise PermissionError("denied by app")
            if info.auth == "new-only" and not info.is_new_user:
                raise PermissionError("not a new user")

        if info.auth == "slow":

            async def later() -> None:
                await asyncio.sleep(SLOW_AUTH_DELAY_S)
                decide()

            return later()
        decide()
        return None

    @server.on("join")
    def greet_join(username: str) -> None:
        if username.startswith("greet"):
            server.broadcast({"type": "conf/greeting", "payload": {"username": username, "on": "join"}})

    @server.on("link")
    def greet_link(username: str) -> None:
        if username.startswith("greet"):
            server.broadcast({"type": "conf/greeting", "payload": {"username": username, "on": "link"}})

    def fail(username: str, request: str, error: str) -> None:
        server.send(username, {"type": "conf/error", "payload": {"request": request, "error": error}})

    def with_username(username: str, message: dict[str, Any], action: Any) -> None:
        payload = message.get("payload")
        if not isinstance(payload, dict) or not isinstance(payload.get("username"), str):
            fail(username, message["type"], "invalid request")
            return
        try:
            action(payload["username"])
        except ServerError as error:
            fail(username, message["type"], str(error))

    @server.on("message")
    def on_message(username: str, message: dict[str, Any]) -> None:
        type_ = message["type"]
        has_payload = "payload" in message
        data = message.get("payload")
        if type_ == "conf/echo":
            server.send(username, {"type": "conf/echoed", "payload": data} if has_payload else {"type": "conf/echoed"})
        elif type_ == "conf/broadcast":
            server.broadcast({"type": "conf/broadcasted", "payload": {"from": username, "data": data}})
        elif type_ == "conf/broadcast-others":
            server.broadcast({"type": "conf/broadcasted", "payload": {"from": username, "data": data}}, skip=username)
        elif type_ == "conf/send":
            if not isinstance(data, dict) or not isinstance(data.get("to"), str):
                fail(username, type_, "invalid request")
                return
            try:
                server.send(data["to"], {"type": "conf/sent", "payload": {"from": username, "data": data.get("data")}})
            except ServerError as error:
                fail(username, type_, str(error))
        elif type_ == "conf/kick":
            with_username(username, message, server.kick)
        elif type_ == "conf/join":
            with_username(username, message, server.join)
        elif type_ == "conf/unlink":
            with_username(username, message, server.unlink)
        elif type_ == "conf/get-users":
            server.send(username, {"type": "conf/users", "payload": server.users})

    return server


async def serve(args: argparse.Namespace, db: str) -> int:
    server = build(
        Server(
            host=args.host, port=args.port, db=db, accept_new_users=not args.no_new_users,
            durability=args.durability,
        )
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    for name in args.prejoin:
        try:
            server.join(name)
        except ServerError as error:
            print(f"cannot prejoin {name!r}: {error}", file=sys.stderr)
            await server.close()
            return 2
    # Until SIGTERM, or until a failure of the log stops the server by itself (it exits 1 then).
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(server.wait_closed())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in waits:
        wait.cancel()
    if server.fatal is not None:
        return 1
    await server.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.conformance", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--no-new-users", action="store_true")
    parser.add_argument("--prejoin", action="append", default=[], metavar="NAME")
    parser.add_argument("--db", default=None, help="event log (default: a temporary file, removed at exit)")
    parser.add_argument("--durability", choices=("full", "normal"), default="full")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)
    configure_logging("json", args.log_level)
    folder = None
    db = args.db
    if db is None:
        folder = tempfile.mkdtemp(prefix="krmx-conformance-")
        db = str(Path(folder) / "lobby.db")
    try:
        return run_event_loop(serve(args, db))
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
