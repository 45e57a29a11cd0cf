"""The package's architecture, checked: imports point down (no cycle, function-level
imports included), no private name crosses a module boundary, no module past 400 lines (unless its first line says why),
and the pure layer loads no framework."""

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jbn"
MODULES = {p.stem: p for p in PACKAGE.glob("*.py")}


def _imports(path: pathlib.Path) -> list[tuple[str, str | None]]:
    """(jbn module imported, name taken from it or None) for every import in the file,
    at any depth (inside functions too)."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name.split(".")[1], None) for a in node.names if a.name.startswith("jbn.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "jbn":
                found += [(a.name, None) if a.name in MODULES else ("__init__", a.name) for a in node.names]
            elif node.module.startswith("jbn."):
                found += [(node.module.split(".")[1], a.name) for a in node.names]
    return found


def _graph() -> dict[str, set[str]]:
    return {name: {m for m, _ in _imports(path) if m != name} for name, path in MODULES.items()}


def test_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, trail):
        if state.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail + [node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, trail + [node])
        state[node] = 2

    for module in sorted(graph):
        visit(module, [])


def test_no_module_imports_the_package_root_or_a_private_name():
    for name, path in MODULES.items():
        for module, imported in _imports(path):
            if name != "__init__":
                assert module != "__init__", (
                    f"jbn/{name}.py imports {imported!r} from the package root (import it from its module)"
                )
            if imported is not None and module != "__init__":
                assert not imported.startswith("_") or imported.startswith("__"), (
                    f"jbn/{name}.py imports the private name {imported} from jbn.{module}"
                )


def test_no_module_is_longer_than_400_lines_unless_its_first_line_says_why():
    long = {name: path for name, path in MODULES.items() if len(path.read_text().splitlines()) > 400}
    unexplained = [name for name, path in long.items() if "400 lines" not in path.read_text().splitlines()[0]]
    assert not unexplained, unexplained


def test_import_jbn_and_batch_norm_load_no_framework():
    code = (
        "import sys, jax.numpy as jnp, jbn\n"
        "y, r = jbn.batch_norm(jnp.ones((4, 3)), jnp.ones(3), jnp.zeros(3), jbn.RunningStats(jnp.zeros(3), jnp.ones(3)),"
        " training=True)\n"
        "jbn.moments(jnp.ones((4, 3)))\n"
        "loaded = sorted(m for m in ('flax', 'tqdm', 'equinox', 'torch', 'keras', 'optax', 'chex') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
        "assert jbn.BatchNorm.__module__ == 'jbn.linen' and 'flax' in sys.modules  # the wrappers load on first use\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
