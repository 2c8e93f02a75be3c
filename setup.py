"""The build: the data plane's modules compiled ahead of time with mypyc when that works here, else pure Python.

Everything else is in pyproject.toml. AENV_GATEWAY_COMPILE says what to do:

    auto (default)  compile when mypyc can be imported, and keep the pure modules where it or the C compiler fails
    1               compile, and fail the build if that fails (the Dockerfile, `make compile`)
    0               never compile (the editable install `make test` runs the pure form on)

The compiled form is the same source: each .py file stays in the package, and an extension module of the
same name, when built, is what Python imports (docs/performance.md says what it saves).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup

# Startup, wiring and the admin side: run once or off the request path, and free to use what mypyc cannot.
# tracing and trace_ids: glue around the OpenTelemetry SDK (itself pure Python, an optional extra that the build
# environment may not have), and trace_ids subclasses one of its classes; only run when tracing is on.
PURE_MODULES = {"__init__", "__main__", "admin", "app", "cli", "config", "configuration", "handshake", "reload",
                "supervisor", "tls", "trace_ids", "tracing"}


def compiled_sources() -> list[str]:
    return sorted(str(path) for path in Path("gateway").rglob("*.py") if path.stem not in PURE_MODULES)


def extensions() -> list[Extension]:
    mode = os.environ.get("AENV_GATEWAY_COMPILE", "auto")
    if mode == "0":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        if mode == "1":
            raise SystemExit("AENV_GATEWAY_COMPILE=1 needs mypy (pip install '.[compile]')") from None
        print("mypyc is not installed: building the pure-Python form", file=sys.stderr)
        return []
    # The shared library all compiled modules use goes inside the package (gateway/native__mypyc.*.so), not
    # beside it: an editable install puts only the package on the import path.
    modules: list[Extension] = mypycify(compiled_sources(), opt_level="3", debug_level="0", group_name="gateway.native")
    for module in modules:
        module.optional = mode != "1"  # a failed C build leaves that module in pure Python
    return modules


setup(ext_modules=extensions())
