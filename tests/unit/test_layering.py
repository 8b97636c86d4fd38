"""The layering rule, read from the source: `runtime` (model, trainer, data, checkpoints) imports
neither `parallel` nor `launch`; `parallel` (everything that talks to other ranks) does not import
`launch` (entry points and application tools); and no modules import each other, directly or
around a cycle. Lazy imports inside functions count too."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYERS = {"runtime": 0, "parallel": 1, "launch": 2}  # a module may import its own layer or lower ones


def _imports() -> dict[str, set[str]]:
    """module -> the quintet modules it imports (resolved to modules, not packages' names)."""
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for layer in LAYERS for p in (REPO / layer).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"{m} imports {t}" for m, targets in _imports().items() for t in targets
              if LAYERS[t.split(".")[0]] > LAYERS[m.split(".")[0]]]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _imports()
    # A package imports its own submodules to re-export them; that is not a cycle of two modules.
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(" -> ".join(stack[stack.index(node):] + [node]))
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for target in sorted(graph[node]):
            visit(target)
        stack.pop()

    for module in sorted(graph):
        visit(module)
    assert not cycles, "\n".join(cycles)
