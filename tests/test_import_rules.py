"""The folder tree's rules, checked on the source (docs/architecture.md): which package may import
which, no import circles, no file over 500 lines, no function over 80 lines.

Every module under fastgrpo/ and megatron_ext/ is parsed with ``ast`` (nothing is imported). An
edge A -> B is an ``import``/``from ... import`` statement in A naming B (``from pkg import name``
names ``pkg.name`` when that is a module, else ``pkg``), or an ``importlib.import_module("B")``
call with a literal name. How imports inside functions count:
- the layering rules (rollout/ imports neither draft/ nor backends/, megatron_ext/ never imports
  fastgrpo.backends) read every import, function-local ones included: a lazy import is still a
  dependency;
- the circle check reads every import too: a circle through a lazy import is a circle hidden from
  import time, not a broken one.
A submodule's implicit import of its parent package's ``__init__`` is not an edge (every package
would otherwise be a circle with its own children).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fastgrpo", "megatron_ext")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80

# Known exceptions, each owned by work in progress elsewhere (issue 11). Anything not listed here
# fails; so does an entry that no longer applies (remove it with the fix that lands).
KNOWN_CIRCLE_EDGES: set[tuple[str, str]] = set()  # (importer, imported)
KNOWN_LONG_FILES: set[str] = set()
KNOWN_LONG_FUNCTIONS: set[str] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module ``name`` refers to (its longest prefix that is one), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _named(module: str, path: Path, node: ast.AST) -> list[str]:
    """The dotted names an import statement or an importlib.import_module call names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            pkg = pkg[: len(pkg) - node.level + 1]
            base = ".".join(pkg + ([base] if base else []))
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return [node.args[0].value]
    return []


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for name in _named(module, path, node):
                target = _resolve(name)
                if target is not None and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


GRAPH = import_graph()


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _forbidden(source: str, targets: tuple[str, ...]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, edges in GRAPH.items() if _in(a, source)
                  for b in edges if any(_in(b, t) for t in targets))


def test_rollout_imports_neither_draft_nor_backends():
    bad = _forbidden("fastgrpo.rollout", ("fastgrpo.draft", "fastgrpo.backends", "fastgrpo.assembly"))
    assert not bad, "rollout/ is the kernel: it must not import what sits above it:\n" + "\n".join(bad)


def test_megatron_ext_does_not_import_backends():
    bad = _forbidden("megatron_ext", ("fastgrpo.backends", "fastgrpo.assembly", "fastgrpo.trainer"))
    assert not bad, "megatron_ext/ is used by backends/, never the reverse:\n" + "\n".join(bad)


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for start, edges in graph.items():
        if start in index:
            continue
        work = [(start, iter(sorted(edges)))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_circles():
    graph = {a: {b for b in edges if (a, b) not in KNOWN_CIRCLE_EDGES} for a, edges in GRAPH.items()}
    circles = _circles(graph)
    lines = [" <-> ".join(c) + "\n    edges: " + ", ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c)
             for c in circles]
    assert not circles, "import circles:\n" + "\n".join(lines)
    stale = sorted(f"{a} -> {b}" for a, b in KNOWN_CIRCLE_EDGES if b not in GRAPH.get(a, ()))
    assert not stale, "KNOWN_CIRCLE_EDGES lists edges that are gone; remove them:\n" + "\n".join(stale)


def test_the_circle_check_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _file_lines() -> dict[str, int]:
    return {_rel(p): len(p.read_text().splitlines()) for p in MODULES.values()}


def _function_lines() -> dict[str, tuple[int, int]]:
    """{"path:function": (first line, length)} of every function over MAX_FUNCTION_LINES."""
    out = {}
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out[f"{_rel(path)}:{node.name}"] = (node.lineno, n)
    return out


def test_no_file_over_500_lines():
    lines = _file_lines()
    long = sorted(f"{f}: {n} lines" for f, n in lines.items() if n > MAX_FILE_LINES and f not in KNOWN_LONG_FILES)
    assert not long, f"files over {MAX_FILE_LINES} lines:\n" + "\n".join(long)
    stale = sorted(f for f in KNOWN_LONG_FILES if lines.get(f, 0) <= MAX_FILE_LINES)
    assert not stale, "KNOWN_LONG_FILES lists files that are short now (or gone); remove them:\n" + "\n".join(stale)


def test_no_function_over_80_lines():
    found = _function_lines()
    long = sorted(f"{name} (line {first}): {n} lines" for name, (first, n) in found.items()
                  if name not in KNOWN_LONG_FUNCTIONS)
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
    stale = sorted(KNOWN_LONG_FUNCTIONS - set(found))
    assert not stale, "KNOWN_LONG_FUNCTIONS lists functions that are short now (or gone); remove them:\n" + \
        "\n".join(stale)
