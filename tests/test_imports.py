"""Dependencies run one way: the graph of every import statement between the project's modules,
those inside functions included, has no cycle; and every module imports."""
import ast
import os
import subprocess
import sys

from conftest import ROOT

# every folder beside the core that holds modules (tests aside)
FOLDERS = sorted(d for d in os.listdir(ROOT)
                 if os.path.isfile(os.path.join(ROOT, d, "__init__.py")) and d != "tests")


def modules():
    """{dotted name: path} of every module of the project (tests aside)."""
    found = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    for d in FOLDERS:
        for f in sorted(os.listdir(os.path.join(ROOT, d))):
            if f.endswith(".py") and f != "__init__.py":
                found[f"{d}.{f[:-3]}"] = os.path.join(ROOT, d, f)
    return found


def import_graph():
    """{module: the project's modules it imports anywhere in its file}."""
    mods, graph = modules(), {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):       # every statement, any depth
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in mods and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph):
    """One cycle as a list of modules (the first one met again at the end), or None."""
    state = {}

    def visit(u, path):
        state[u] = "open"
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                return path[path.index(v):] + [v]
            if v not in state and (cycle := visit(v, path + [v])):
                return cycle
        state[u] = "done"
        return None

    for u in sorted(graph):
        if u not in state and (cycle := visit(u, [u])):
            return cycle
    return None


def test_find_cycle_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": set(), "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


def test_no_import_cycle_lazy_imports_included():
    graph = import_graph()
    assert {"compat", "display", "fast", "training", "tools"} <= set(FOLDERS)
    assert graph["distill"] and graph["compat.hf"]     # the graph was really read
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_every_module_imports():
    """Every module, in one fresh interpreter, extras first (each pulls in the core it needs): a
    name that moved without its importers fails here."""
    mods = sorted(modules(), key=lambda m: ("." not in m, m))
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    r = subprocess.run([sys.executable, "-c", code, *mods], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-800:]
