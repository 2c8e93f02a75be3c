"""What the compiled form (mypyc, setup.py) asks of the code, and how a user tells which form runs.

The suite runs on both forms (`make test`, `make test-compiled`); these tests hold the rules that keep
the two alike, and pass on either.
"""

from __future__ import annotations

import ast
import asyncio
import subprocess
import sys
from pathlib import Path

from gateway import __version__
from gateway.retry import retry_refused

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = ROOT / "gateway"


def pure_modules() -> set[str]:
    """setup.py's PURE_MODULES, read from its source (importing setup.py would run the build)."""
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.Assign) and any(getattr(target, "id", "") == "PURE_MODULES" for target in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("setup.py defines no PURE_MODULES")


def compiled_sources() -> list[Path]:
    return [path for path in sorted(GATEWAY.rglob("*.py")) if path.stem not in pure_modules()]


def test_no_compiled_module_awaits_inside_an_except_or_finally_block() -> None:
    # Compiled code suspended there leaves its exception as the one being handled for every other task
    # until it resumes: their exceptions chain to it (__context__), and whatever keeps one of those (a
    # stored error, a log record) keeps the other request's traceback and objects alive.
    found = []
    for path in compiled_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            blocks = [node.body] if isinstance(node, ast.ExceptHandler) else []
            if isinstance(node, ast.Try | ast.TryStar) and node.finalbody:
                blocks.append(node.finalbody)
            found += [f"{path.relative_to(ROOT)}:{inner.lineno}" for block in blocks for statement in block
                      for inner in ast.walk(statement) if isinstance(inner, ast.Await | ast.AsyncWith | ast.AsyncFor)]
    assert found == [], "await outside the except/finally block instead"


async def test_a_retry_waiting_leaves_no_exception_for_other_tasks_to_chain_to() -> None:
    async def refused() -> None:
        raise ConnectionRefusedError(111, "refused")

    retrying = asyncio.ensure_future(retry_refused(refused, budget_s=0.3))
    contexts = []
    for _ in range(100):  # bounded: ~0.2 s, while the retry waits between attempts
        await asyncio.sleep(0.002)
        try:
            raise ValueError("another request's own failure")
        except ValueError as exc:
            contexts.append(exc.__context__)
    try:
        await retrying
    except ConnectionRefusedError:
        pass

    assert set(contexts) == {None}


def test_version_names_the_form_that_runs() -> None:
    compiled = any(GATEWAY.glob("native__mypyc.*.so"))

    result = subprocess.run([sys.executable, "-m", "gateway", "--version"], cwd=ROOT, capture_output=True, text=True,
                            timeout=30, check=True)

    line = result.stdout.strip()
    form = "(compiled: " if compiled else "(pure;"
    assert line.startswith(f"mcp-gateway {__version__} {form}")
    assert f"Python {sys.version.split()[0]}" in line
