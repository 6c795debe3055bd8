"""The package reads top-down: libraries < config/sampler < jobs < main, with no import cycle.

Read from the modules' source (every import statement, function-level ones included), so a
lazy import cannot hide an arrow running back up.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "udit_jax"

# Layer of each top-level module or subpackage (udit_jax.<name>); a higher layer may import a
# lower or its own, never a higher one.
LAYERS = {
    "models": 0, "diffusion": 0, "data": 0, "parallel": 0, "checkpoints": 0, "convert": 0,
    "errors": 0, "paths": 0, "cpu_host": 0, "executables": 0, "hlo_cost": 0, "memory_fit": 0,
    "config": 1, "sampler": 1,
    "train": 2, "export": 2, "sample": 2, "evaluation": 2, "compile": 2,
    "main": 3,
}


def module_names() -> dict[str, pathlib.Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("udit_jax",) + path.relative_to(PACKAGE).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules its source imports (anywhere in the file)."""
    mods = module_names()
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        package = m if path.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                # `from a import b`: the submodule a.b when there is one, else a itself.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            else:
                continue
            graph[m].update(t for t in targets if t in mods and t != m)
    return graph


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else None   # the package face has no layer


def test_every_module_has_a_layer():
    unknown = {m.split(".")[1] for m in module_names() if "." in m} - set(LAYERS)
    assert not unknown, f"add {sorted(unknown)} to LAYERS"


def test_no_import_runs_up_a_layer():
    upward = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
              for m, targets in import_graph().items() for t in targets
              if layer(m) is not None and layer(t) is not None and layer(t) > layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph, state, cycles = import_graph(), {}, []

    def visit(v, stack):
        state[v] = "open"
        for w in sorted(graph[v]):
            # A submodule importing names from its own package's face is not a cycle.
            if v.startswith(w + "."):
                continue
            if state.get(w) == "open":
                cycles.append(" -> ".join(stack[stack.index(w):] + [w]))
            elif w not in state:
                visit(w, stack + [w])
        state[v] = "done"

    for v in sorted(graph):
        if v not in state:
            visit(v, [v])
    assert not cycles, "\n".join(cycles)


def test_no_job_imports_the_trainer():
    """What a config means is udit_jax.config's: no job imports train to learn it. The one
    exception is compile, whose subject is the train step itself."""
    importers = sorted(m for m, targets in import_graph().items() if "udit_jax.train" in targets)
    assert importers in ([], ["udit_jax.compile"]), importers

