"""The core's dependencies run one way: the five core files import no extra at module level (only
inside the branch of the flag that needs it), and every module imports."""
import ast
import os
import subprocess
import sys

from conftest import ROOT

CORE = ["model", "data", "distill", "decode", "bench"]
EXTRAS = ["compat", "synthetic", "parallel", "fast", "tools"]


def module_level_imports(path):
    """Top-level names imported by the statements at a module's top level (not in functions)."""
    names = set()
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_core_imports_no_extra_at_module_level():
    for name in CORE:
        imported = module_level_imports(os.path.join(ROOT, name + ".py"))
        assert not imported & set(EXTRAS), (name, imported & set(EXTRAS))
    order = {m: i for i, m in enumerate(CORE)}        # and among themselves, reading order only
    for name in CORE:
        for dep in module_level_imports(os.path.join(ROOT, name + ".py")) & set(CORE):
            assert order[dep] < order[name], (name, dep)


def test_every_module_imports():
    """Every module, in one fresh interpreter, extras first (each pulls in the core it needs): a
    module-level cycle or a name that moved without its importers fails here."""
    mods = [f"{d}.{f[:-3]}" for d in EXTRAS for f in sorted(os.listdir(os.path.join(ROOT, d)))
            if f.endswith(".py") and f != "__init__.py"] + CORE
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    r = subprocess.run([sys.executable, "-c", code, *mods], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-800:]
