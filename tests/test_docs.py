"""The documents the code cites exist and hold what it cites: every `docs/METHOD.md, "Section"`
names a heading of docs/METHOD.md, every quoted phrase is in it, and every file the README's
tree and commands name is in the repository."""
import os
import re

from conftest import ROOT

CITE = re.compile(r"docs/METHOD\.md[,:]\s*\"([^\"]+)\"")


def sources():
    for d, _, files in os.walk(ROOT):
        rel = os.path.relpath(d, ROOT)
        if rel != "." and any(p.startswith(".") or p in ("runs", "__pycache__") for p in rel.split(os.sep)):
            continue
        for f in files:
            if f.endswith(".py") and f != "test_docs.py":
                yield os.path.join(d, f)


def test_every_method_citation_resolves():
    text = open(os.path.join(ROOT, "docs", "METHOD.md")).read()
    plain = text.replace("`", "")
    headings = [h.replace("`", "") for h in re.findall(r"^#+ (.+)$", text, re.M)]
    cited = 0
    for path in sources():
        src = " ".join(open(path).read().split())          # citations may wrap lines
        src = src.replace('""" ', "").replace('" "', "")
        for name in CITE.findall(src):
            cited += 1
            assert any(name in h for h in headings) or name in plain, (path, name)
    assert cited >= 4


def test_readme_names_only_files_that_exist():
    readme = open(os.path.join(ROOT, "README.md")).read()
    named = set(re.findall(r"(?<![\w/.-])((?:docs|tools|tests|compat|synthetic|parallel|fast|training|display)"
                           r"/[\w./-]+\.(?:py|md|sh|png))", readme))
    named |= {f"tools/{m}.py" for m in re.findall(r"python -m tools\.(\w+)", readme)}
    assert named
    missing = sorted(n for n in named if not os.path.exists(os.path.join(ROOT, n)))
    assert not missing, missing
