#!/usr/bin/env python3
"""Checks the import structure the architecture document promises.

* corrald (crates/server/src): a module may import (`crate::<layer>`) only its
  own layer or a lower one, in the order of LAYERS; no import circles between
  layers, nor between the class modules of `ops/`.
* every crate: no import circle between its top-level modules, nor
  between any of its files.
* no hand-written source file over MAX_LINES lines (tests excluded).
* xe's server side (crates/server/src/cli) calls the API only: it names
  neither the database (`.db`) nor the operations layer's entry points.

Imports are read as text (`crate::a::b`, `crate::a::{b, c}`, `super::x`), which
is what the rule is about: a name written in a file. Exit status 1 on any
failure, with one line per failure.
"""
import os
import re
import sys

# Lowest first. `forward` is the routing seam between dispatch and ops.
LAYERS = ["core", "auth", "context", "drivers", "init", "ops", "forward",
          "dispatch", "cli", "wire", "daemon", "main"]
MAX_LINES = 800

root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".")
failures = []


def sources(src):
    for d, dirs, names in os.walk(src):
        dirs[:] = [x for x in dirs if x != "bin"]
        for n in sorted(names):
            if n.endswith(".rs"):
                yield os.path.join(d, n)


def body_of(path):
    text = open(path, encoding="utf-8").read()
    # unit tests may reach anything they test
    return text.split("#[cfg(test)]")[0]


def module_path(src, path):
    """crates/x/src/a/b.rs -> ['a', 'b']; a/mod.rs -> ['a']; lib.rs -> []"""
    rel = os.path.relpath(path, src)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib", "main") and (len(rel) > 1 or rel[-1] != "main"):
        rel = rel[:-1]
    return rel


def imports(body, me):
    """Module paths (lists) this file names through crate:: or super::."""
    found = []
    for m in re.finditer(r"\bcrate::((?:[a-z_][a-z0-9_]*::)*)(\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*)", body):
        head = [p for p in m.group(1).split("::") if p]
        tail = m.group(2)
        if tail.startswith("{"):
            for part in tail[1:-1].split(","):
                part = part.strip().split("::")[0]
                if part and part != "self":
                    found.append(head + [part])
            found.append(head)
        else:
            found.append(head + [tail])
    for m in re.finditer(r"\bsuper::([a-z_][a-z0-9_]*)", body):
        found.append(me[:-1] + [m.group(1)] if me else [m.group(1)])
    return found


def circles(edges):
    """Strongly connected components with more than one member (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def check_crate(crate):
    src = os.path.join(root, "crates", crate, "src")
    if not os.path.isdir(src):
        return
    top_edges, ops_edges, file_edges = {}, {}, {}
    known_top, known = set(), set()
    for path in sources(src):
        me = module_path(src, path)
        known.add(tuple(me))
        if me:
            known_top.add(me[0])
    for path in sources(src):
        rel = os.path.relpath(path, root)
        body = body_of(path)
        lines = body.count("\n")
        if lines > MAX_LINES:
            failures.append(f"long file: {rel} ({lines} lines, limit {MAX_LINES})")
        me = module_path(src, path)
        mine = me[0] if me else (os.path.basename(path)[:-3])
        if crate == "server" and mine == "cli":
            for n, line in enumerate(body.split("\n"), 1):
                if re.search(r"\.db\b|\btask_create\b|\btask_destroy\b|\bcrate::ops\b", line):
                    failures.append(f"xe's server side bypasses the API: {rel}:{n}: {line.strip()}")
        for target in imports(body, me):
            if not target or target[0] not in known_top:
                continue
            # the file the name comes from: the longest known module prefix
            mod = next((tuple(target[:n]) for n in range(len(target), 0, -1)
                        if tuple(target[:n]) in known), None)
            # A file may use the items of the module it is declared in (its
            # parent's types and helpers); only other edges can close a circle.
            if mod is not None and mod != tuple(me) and tuple(me[:len(mod)]) != mod:
                file_edges.setdefault(tuple(me), set()).add(mod)
            other = target[0]
            if other != mine:
                top_edges.setdefault(mine, set()).add(other)
                if crate == "server" and mine in LAYERS and other in LAYERS \
                        and LAYERS.index(other) > LAYERS.index(mine):
                    failures.append(f"import against the layers: {rel} names crate::{other} "
                                    f"({mine} is below {other})")
            elif crate == "server" and mine == "ops" and len(me) > 1 and len(target) > 1 \
                    and target[1] != me[1]:
                ops_edges.setdefault(me[1], set()).add(target[1])
    for c in circles(top_edges):
        failures.append(f"import circle in crates/{crate}: " + " <-> ".join(c))
    for c in circles(ops_edges):
        failures.append("import circle between ops classes: " + " <-> ".join(c))
    for c in circles(file_edges):
        failures.append(f"import circle between files of crates/{crate}: "
                        + " <-> ".join("::".join(m) or "lib" for m in c))


for crate in sorted(os.listdir(os.path.join(root, "crates"))):
    check_crate(crate)
for f in failures:
    print("FAIL", f)
print(f"check-layers: {len(failures)} failures")
sys.exit(1 if failures else 0)
