"""The npm packages of the tests (``tests/js/package.json``: the official ``@krmx/client`` 0.5.4 and the official
``@krmx/server`` 0.5.5), installed once into a cache folder of the tests' own, outside the repository.

The folder is ``$KRMX_LOBBY_TESTS_CACHE`` if set, otherwise ``${XDG_CACHE_HOME:-~/.cache}/krmx-lobby-tests``,
falling back to a folder in the system temp dir; one sub-folder per hash of the package files, installed
(``npm ci``) only when missing, next to its final place and then renamed, so a concurrent or interrupted run
never sees half of it. Node.js (>= 18) and npm must be on ``PATH``: without them the tests that need them fail,
saying so. Used by ``tests/test_official_client.py`` and ``tests/test_client.py`` (through the session fixture
``js_env`` of ``tests/conftest.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

__all__ = ["JS_DIR", "JsEnv", "JsSetupError", "install_js_packages", "install_official_client"]

JS_DIR = Path(__file__).resolve().parent / "js"
INSTALL_TIMEOUT = 600.0
MIN_NODE_MAJOR = 18


class JsSetupError(Exception):
    """Node, npm or the npm install is not usable; the message says what to do."""


@dataclass(frozen=True)
class JsEnv:
    node: str
    #: The folder holding node_modules with tests/js/package.json's dependencies.
    install_dir: Path


def _pinned_dependencies() -> dict[str, str]:
    return json.loads((JS_DIR / "package.json").read_text(encoding="utf-8"))["dependencies"]


def _package_files() -> list[Path]:
    return [p for p in (JS_DIR / "package.json", JS_DIR / "package-lock.json") if p.exists()]


def _cache_roots() -> list[Path]:
    override = os.environ.get("KRMX_LOBBY_TESTS_CACHE")
    if override:
        return [Path(override)]
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return [Path(xdg) / "krmx-lobby-tests", Path(tempfile.gettempdir()) / f"krmx-lobby-tests-{uid}"]


def _writable_cache_root() -> Path:
    tried = []
    for root in _cache_roots():
        try:
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=root, prefix=".probe-"):
                pass
            return root
        except OSError as error:
            tried.append(f"{root}: {error}")
    raise JsSetupError("no writable cache folder for the npm packages of the tests:\n  "
                       + "\n  ".join(tried) + "\nset KRMX_LOBBY_TESTS_CACHE to a writable folder")


def _is_complete(install_dir: Path) -> bool:
    if not (install_dir / ".complete").exists():
        return False
    for name, version in _pinned_dependencies().items():
        manifest = install_dir / "node_modules" / name / "package.json"
        try:
            if json.loads(manifest.read_text(encoding="utf-8")).get("version") != version:
                return False
        except (OSError, ValueError):
            return False
    return True


def _run_checked(args: list[str], *, cwd: Path | None = None, timeout: float = 60.0) -> str:
    try:
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "npm_config_update_notifier": "false"})
    except subprocess.TimeoutExpired:
        raise JsSetupError(f"`{' '.join(args)}` did not finish within {timeout:.0f} s") from None
    except OSError as error:
        raise JsSetupError(f"cannot run `{' '.join(args)}`: {error}") from None
    if done.returncode != 0:
        raise JsSetupError(f"`{' '.join(args)}` failed with exit code {done.returncode}\n"
                           f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-4000:]}")
    return done.stdout


def install_js_packages() -> JsEnv:
    """Check node and npm, then install tests/js's packages into the cache (only when not there yet)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    missing = [name for name, path in (("node", node), ("npm", npm)) if path is None]
    if missing:
        raise JsSetupError(
            f"the tests with the official Krmx client and server need Node.js (>= {MIN_NODE_MAJOR}) and npm on "
            f"PATH, but {' and '.join(f'`{m}`' for m in missing)} {'was' if len(missing) == 1 else 'were'} not "
            "found. Install Node.js with npm (https://nodejs.org or your package manager) and run the tests again."
        )
    assert node is not None and npm is not None
    version = _run_checked([node, "--version"]).strip()
    match = re.match(r"v(\d+)\.", version)
    if match is None or int(match.group(1)) < MIN_NODE_MAJOR:
        raise JsSetupError(f"the tests with the official Krmx client and server need Node.js >= {MIN_NODE_MAJOR}; "
                           f"`node --version` says {version!r}")

    digest = hashlib.sha256()
    for path in _package_files():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    root = _writable_cache_root()
    install_dir = root / f"js-{digest.hexdigest()[:16]}"
    if _is_complete(install_dir):
        return JsEnv(node, install_dir)

    # Install next to the final folder, then rename: a concurrent or interrupted run never sees half of it.
    staging = root / f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        for path in _package_files():
            shutil.copy2(path, staging / path.name)
        has_lock = (staging / "package-lock.json").exists()
        _run_checked([npm, "ci" if has_lock else "install", "--no-audit", "--no-fund", "--loglevel=error"],
                     cwd=staging, timeout=INSTALL_TIMEOUT)
        (staging / ".complete").write_text("ok\n")
        if not _is_complete(staging):
            raise JsSetupError(f"npm finished but {staging}/node_modules lacks the pinned versions "
                               f"{_pinned_dependencies()}")
        if install_dir.exists():  # a stale, incomplete install (or another run finished first)
            if _is_complete(install_dir):
                return JsEnv(node, install_dir)
            shutil.rmtree(install_dir, ignore_errors=True)
        try:
            staging.rename(install_dir)
        except OSError:
            if not _is_complete(install_dir):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return JsEnv(node, install_dir)


#: The name tests/test_official_client.py has always used.
install_official_client = install_js_packages
