#!/usr/bin/env python3
"""Structure checks that CI runs (scripts/test.sh):

1. no import cycle between the crate's top-level modules (src/<m>.rs or
   src/<m>/): an edge a -> b is any `crate::b` path in a's files;
2. the bottom layer (src/support) imports nothing from the crate;
3. no Rust file under src/, bench/ or tests/ is over 800 lines;
4. docs/architecture.md names every module under src/ (each file and
   directory, as `src/path`).

Exits 1 with one line per finding. Standard library only.
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
MAX_LINES = 800
# main.rs and lib.rs are the crate roots, not modules.
ROOTS = {"main", "lib"}

problems = []


def top_module(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".rs")


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line.split("//", 1)[0] for line in text.splitlines())


def module_graph():
    edges = {}
    for f in sorted(SRC.rglob("*.rs")):
        m = top_module(f)
        if m in ROOTS:
            continue
        text = strip_comments(f.read_text())
        # `#[cfg(test)] mod tests` may reach anywhere; stop at it.
        text = text.split("#[cfg(test)]\nmod tests")[0]
        targets = set(re.findall(r"\bcrate::([a-z_][a-z0-9_]*)", text))
        # `use crate::{a, b::c}` groups.
        for group in re.findall(r"\bcrate::\{([^}]*)\}", text):
            targets.update(re.findall(r"(?:^|,)\s*([a-z_][a-z0-9_]*)", group))
        edges.setdefault(m, set()).update(t for t in targets if t != m)
    return edges


def cycles(edges):
    """Tarjan's strongly connected components of size > 1."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


edges = module_graph()
for comp in cycles(edges):
    inner = [f"{a} -> {b}" for a in comp for b in sorted(edges[a]) if b in comp]
    problems.append(f"import cycle between {', '.join(comp)}: {'; '.join(inner)}")

for m in ("support",):
    if edges.get(m):
        problems.append(f"src/{m} is the bottom layer but imports crate::{', crate::'.join(sorted(edges[m]))}")

for d in ("src", "bench", "tests"):
    for f in sorted((ROOT / d).rglob("*.rs")):
        n = len(f.read_text().splitlines())
        if n > MAX_LINES:
            problems.append(f"{f.relative_to(ROOT)}: {n} lines (at most {MAX_LINES}; split it by job)")

arch = (ROOT / "docs" / "architecture.md").read_text()
lines = arch.splitlines()


def named_file(rel: pathlib.PurePath) -> bool:
    """`src/a/b.rs` anywhere, or `b.rs` (or `b`) on a line naming `src/a/`."""
    if f"`src/{rel}`" in arch:
        return True
    parent = f"`src/{rel.parent}/"
    return any(
        parent in line and (f"`{rel.name}`" in line or f"`{rel.stem}`" in line)
        for line in lines
    )


for f in sorted(SRC.rglob("*")):
    rel = f.relative_to(SRC)
    if f.is_dir():
        ok = f"`src/{rel}/" in arch
    elif f.suffix == ".rs" and f.name != "mod.rs":
        ok = named_file(rel)
    else:
        continue
    if not ok:
        problems.append(f"docs/architecture.md does not name src/{rel}{'/' if f.is_dir() else ''}")

for p in problems:
    print(p)
if problems:
    sys.exit(1)
print(f"structure ok: {len(edges)} modules, no cycles, no file over {MAX_LINES} lines")
