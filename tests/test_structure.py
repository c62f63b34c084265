"""The package's shape, checked: import graph, pure core, function size, one idiom each.

These read the source with `ast`; they compile nothing and take well under a second.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "nnx_parallel"
MAX_CODE_LINES = 45


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """Every nnx_parallel module `name` imports, at module or function level."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                )
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    # Importing a package runs its __init__, but `from pkg import sub` needs only sub.
    return {t for t in found if not (t == "nnx_parallel" and name != "nnx_parallel")}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(GRAPH[node]):
            if dep.startswith(node + ".") and node.count(".") < dep.count("."):
                continue  # a package re-exporting its submodules
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    assert _cycle() is None, " -> ".join(_cycle())


def test_core_imports_nothing_from_the_runtime():
    bad = {
        name: sorted(d for d in deps if d.startswith("nnx_parallel.runtime"))
        for name, deps in GRAPH.items()
        if name.startswith("nnx_parallel.core")
    }
    assert not {k: v for k, v in bad.items() if v}


def _code_lines(source: list[str], node) -> int:
    body = node.body
    doc = None
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(getattr(body[0], "value", None), ast.Constant)
    ):
        doc = range(body[0].lineno, body[0].end_lineno + 1)
    lines = range(node.lineno, node.end_lineno + 1)
    return sum(
        1
        for i in lines
        if source[i - 1].strip()
        and not source[i - 1].strip().startswith("#")
        and not (doc and i in doc)
    )


def test_no_function_over_45_code_lines():
    long = []
    for name, path in MODULES.items():
        source = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(source))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _code_lines(source, node)
                if n > MAX_CODE_LINES:
                    long.append(f"{name}.{node.name}: {n}")
    assert not long


# The spec-entry idiom and version-sensitive JAX calls each have one home.
_IDIOM = re.compile(r"\(\w+(\.\w+)?,\) if isinstance\(")
_VERSIONED = re.compile(
    r"jax\.sharding\.(reshard|get_abstract_mesh|use_abstract_mesh|auto_axes|AbstractMesh)\b"
    r"|jax\.lax\.(pcast|with_sharding_constraint)\b|jax\.shard_map\b|jax\.experimental\.shard_map"
)


@pytest.mark.parametrize(
    "pattern, home",
    [(_IDIOM, "nnx_parallel._specs"), (_VERSIONED, "nnx_parallel._compat")],
    ids=["spec-entry idiom", "version-sensitive calls"],
)
def test_one_home(pattern, home):
    found = [
        f"{name}:{i}"
        for name, path in MODULES.items()
        if name != home and not name.startswith(home + ".")
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and ">>>" not in line and "..." not in line[:8]
    ]
    assert not found


def test_graph_reads_the_package():
    # A guard for the tests above: they must see the real modules and imports.
    assert "nnx_parallel.core.resolve" in GRAPH and "nnx_parallel.runtime.dispatch" in GRAPH
    assert "nnx_parallel.core.styles" in GRAPH["nnx_parallel.core.resolve"]
    assert "nnx_parallel.runtime.fsdp" in GRAPH["nnx_parallel.runtime.dispatch"]


# The runtime as one decision (issue 20) -------------------------------------------------

RUNTIME = {n: p for n, p in MODULES.items() if n.startswith("nnx_parallel.runtime.")}


def _functions(path):
    return [
        node.name
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]


def test_one_route_function():
    """The whole decision is `runtime.routes.route`; no second copy for `explain`."""
    owners = [n for n, p in MODULES.items() if "route" in _functions(p)]
    assert owners == ["nnx_parallel.runtime.routes"]
    for name, path in MODULES.items():
        assert "static_route" not in path.read_text(), name


def test_no_retry_matches_message_text():
    """A retry matches error types: no `str(error)` / `in str(e)` inside an
    `except` handler's condition anywhere in the runtime."""
    for name, path in RUNTIME.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ExceptHandler):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.If):
                    text = ast.unparse(sub.test)
                    assert "str(" not in text and "repr(" not in text, (name, text)


def test_no_module_level_mutable_state_in_the_runtime():
    """Per-trace state lives in `runtime.trace.Trace`; module level holds only
    constants (tuples, frozensets, strings, dataclass instances, functions)."""
    mutable = (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)
    # The exceptions, process-level and read by no trace: the class cache of
    # `install.hooked_class` (one hooked subclass per (class, hooks) pair), and
    # the dropped-token counts the all-to-all dispatch's callback records at
    # run time (`experts_a2a.dropped_tokens`).
    allowed = {
        ("nnx_parallel.runtime.install", "_REGISTRY"),
        ("nnx_parallel.runtime.experts_a2a", "_STATS"),
    }
    for name, path in RUNTIME.items():
        tree = ast.parse(path.read_text())
        for node in tree.body:
            target = (
                node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
            )
            if (name, getattr(target, "id", None)) in allowed:
                continue
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, mutable):
                raise AssertionError(f"{name}: module-level mutable {ast.unparse(node)[:80]}")
            if isinstance(node, ast.Global) or any(
                isinstance(sub, ast.Global) for sub in ast.walk(node)
            ):
                raise AssertionError(f"{name}: `global` statement")


MAX_MODULE_LINES = 400


def test_no_source_module_over_400_lines():
    long = {
        name: n
        for name, path in MODULES.items()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"split these by idea: {long}"


def _namesakes(name: str, path: pathlib.Path) -> set[str]:
    """Test file names that mirror module `name`: `a/b/_c.py` -> test_c.py or test_b_c.py."""
    parts = [p.lstrip("_") for p in name.split(".")[1:]]
    own, parent = parts[-1], (parts[-2] if len(parts) > 1 else None)
    nested = len(parts) > 1
    out = {f"test_{parent}_{own}.py"} if nested else {f"test_{own}.py"}
    if nested and not (SRC / f"{own}.py").exists() and not (SRC / own).is_dir():
        out.add(f"test_{own}.py")  # no top-level namesake to confuse it with
    return out


def _defines_code(path: pathlib.Path) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in tree.body)


def test_every_source_module_has_a_namesake_test():
    tests = {p.name for p in (SRC.parents[1] / "tests").glob("test_*.py")}
    missing = [
        name
        for name, path in MODULES.items()
        if name != "nnx_parallel"
        and (path.name != "__init__.py" or _defines_code(path))
        and not _namesakes(name, path) & tests
    ]
    assert not missing, f"add tests/test_<module>.py for: {missing}"
