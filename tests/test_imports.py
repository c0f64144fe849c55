"""The package's import graph has no cycles, and every module imports on its own.

The graph is read from the source (module-level `import` and `from ... import` statements;
imports inside functions are deferred on purpose and not counted); importing a submodule also
imports its parent packages. A cycle makes import order matter, which is how half-initialised
modules and "partially initialized module" errors appear, so none is allowed. Then one fresh
interpreter imports every module in dependency order (leaves first).
"""

import ast
import os
import subprocess
import sys

from fomo_jax import runtime

PACKAGE = "fomo_jax"


def modules() -> dict[str, str]:
    """{module name: file} of every module of the package."""
    root = os.path.join(runtime.REPO_ROOT, PACKAGE)
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, runtime.REPO_ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = path
    return out


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def graph() -> dict[str, set[str]]:
    """{module: modules it imports at module level} (within the package)."""
    known = modules()
    edges = {}
    for name, path in known.items():
        tree = ast.parse(open(path).read(), path)
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        found = set()
        for node in tree.body:  # module level only
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))  # fmt: skip
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target in known:
                    found.add(target)
                    found.update(p for p in _parents(target) if p in known)
        found.discard(name)
        found -= set(_parents(name))  # a module's own packages are importing it
        edges[name] = found
    return edges


def cycles(edges) -> list[list[str]]:
    """Every cycle found by a depth-first search (one per back edge)."""
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def dependency_order(edges) -> list[str]:
    order, seen = [], set()

    def visit(node):
        if node in seen:
            return
        seen.add(node)
        for nxt in sorted(edges[node]):
            visit(nxt)
        order.append(node)

    for node in sorted(edges):
        visit(node)
    return order


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    edges = graph()
    assert (
        "fomo_jax.continual.runner" in edges
        and "fomo_jax.continual.loop" in edges["fomo_jax.continual.runner"]
    )
    assert cycles(edges) == []


def test_every_module_imports_in_dependency_order_in_a_fresh_interpreter():
    order = dependency_order(graph())
    code = f"import importlib\nfor name in {order!r}:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=runtime.REPO_ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]


def test_importing_and_configuring_starts_no_jax_backend():
    """`jax.distributed.initialize` must come before any backend: importing fomo_jax, its
    command line and its configs must not start one (a module-level `jax.random.key` would)."""
    code = (
        "from jax._src import xla_bridge\n"
        "import fomo_jax.cli, fomo_jax.continual.runner, fomo_jax.train.pretrain\n"
        "from fomo_jax.configs import fif, fif_synth, clip_synth\n"
        "fif.get_config(); fif_synth.get_config('smoke'); clip_synth.get_config()\n"
        "assert not xla_bridge._backends, xla_bridge._backends\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=runtime.REPO_ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
