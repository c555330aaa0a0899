"""The house's shape, read from the code: stage folders import downwards only (the import-linter
contracts in pyproject.toml), no module imports itself through others, modules stay small and say what
they own."""
import ast
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 400


def test_stages_import_downwards_only_and_edge_never_reaches_export_or_torch():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout or "broken" not in done.stdout.split("Contracts:")[-1]


def _circles(graph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for start in sorted(modules):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start) & modules)))]
        index[start] = low[start] = counter[0]; counter[0] += 1
        stack.append(start); on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]; counter[0] += 1
                    stack.append(child); on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child) & modules))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop(); on_stack.discard(member); component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_no_module_of_edge_imports_itself_through_others():
    graph = grimp.build_graph("edge")
    # A package's __init__ that hands names on is not an arrow of its own: count modules only.
    modules = {m for m in graph.modules if not graph.find_children(m)}
    assert _circles(graph, modules) == []


def _edge_modules() -> list[Path]:
    return sorted(p for p in (ROOT / "edge").rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_of_edge_is_short_and_says_what_it_owns():
    long = {str(p.relative_to(ROOT)): n for p in _edge_modules()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}, f"modules over {MAX_MODULE_LINES} lines: {long}"
    silent = [str(p.relative_to(ROOT)) for p in _edge_modules() if not ast.get_docstring(ast.parse(p.read_text()))]
    assert silent == []
