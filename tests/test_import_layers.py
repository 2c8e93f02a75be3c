"""The arrows between gateway's modules run one way (docs/architecture.md).

Read from the source with ast, not by importing: every module-level import counts, those under
`if TYPE_CHECKING:` too (a cycle that only the type checker sees is still a cycle in the design),
and imports inside functions do not (cli's lazy ones are deliberate). `python -m tests.test_import_layers`
prints the graph and any cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"


def module_name(path: Path) -> str:
    parts = path.relative_to(GATEWAY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level(tree: ast.Module) -> list[ast.stmt]:
    """The module's statements, with the bodies of `if` blocks (TYPE_CHECKING) opened up."""
    statements: list[ast.stmt] = []
    pending = list(tree.body)
    while pending:
        statement = pending.pop(0)
        if isinstance(statement, ast.If):
            pending[:0] = [*statement.body, *statement.orelse]
        else:
            statements.append(statement)
    return statements


def import_graph() -> dict[str, set[str]]:
    """module -> the gateway modules it imports at module level."""
    paths = sorted(GATEWAY.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        name = module_name(path)
        targets: set[str] = set()
        for statement in _module_level(ast.parse(path.read_text(), str(path))):
            if isinstance(statement, ast.Import):
                targets.update(alias.name for alias in statement.names)
            elif isinstance(statement, ast.ImportFrom) and statement.module is not None and statement.level == 0:
                for alias in statement.names:  # `from gateway import sse` imports the module gateway.sse
                    submodule = f"{statement.module}.{alias.name}"
                    targets.add(submodule if submodule in modules else statement.module)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_only_app_knows_the_server() -> None:
    """The handlers speak gateway.messages; the server, which holds the client sockets, is app's to wire."""
    importers = sorted(name for name, targets in import_graph().items() if "gateway.server" in targets)
    assert importers == ["gateway.app"]


if __name__ == "__main__":
    graph = import_graph()
    for name in sorted(graph):
        print(f"{name} -> {', '.join(sorted(target.removeprefix('gateway.') for target in graph[name])) or '-'}")
    found = cycles(graph)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} arrows, cycles: {found or 'none'}")
