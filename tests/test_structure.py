"""The package's import structure, read from the source (nothing is imported or compiled):

- no import cycles between the project's modules (mimo_jax, kernels_pallas);
- no module imports another module's `_private` name;
- no function-local import, except of optional heavy dependencies, private JAX internals and
  libtpu paths, each with a one-line reason on the import.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("mimo_jax", "kernels_pallas")
# Modules a function may import for itself (with a reason on the line): optional or heavy
# dependencies, JAX internals a release may move, and the libtpu paths.
LOCAL_IMPORT_ALLOWED = ("torch", "transformers", "jinja2", "jax._src", "jax", "kernels_pallas.tpu_aot")


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name.endswith("_test.py") or path.name == "__main__.py":
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: pathlib.Path, modules) -> list[tuple[ast.AST, str, list[str]]]:
    """(node, imported project module, imported names) for every project import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node, a.name, []) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in modules:
                submodules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                names = [a.name for a in node.names if f"{node.module}.{a.name}" not in modules]
                found += [(node, m, []) for m in submodules]
                if names:
                    found.append((node, node.module, names))
    return found


def test_no_import_cycles_between_project_modules():
    modules = _modules()
    graph = {name: sorted({m for _, m, _ in _imports(path, modules) if m != name}) for name, path in modules.items()}
    # The package __init__ re-exports the public API: a module importing `mimo_jax` itself would
    # loop through it, so it counts as an edge like any other.
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    offenders = [f"{path.relative_to(ROOT)}:{node.lineno}: {module}.{name}"
                 for path in modules.values() for node, module, names in _imports(path, modules)
                 for name in names if name.startswith("_")]
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)


def test_function_local_imports_are_only_optional_or_libtpu_ones_with_a_reason():
    offenders = []
    for path in _modules().values():
        lines = path.read_text().splitlines()
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                allowed = (any(module == m or module.startswith(m + ".") for m in LOCAL_IMPORT_ALLOWED)
                           or (path.stem == "libtpu_setup" and module == "jax"))
                reason = "#" in lines[node.lineno - 1]
                if not (allowed and reason):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not offenders, "function-local imports (move them to the top, or say why not):\n" + "\n".join(offenders)
