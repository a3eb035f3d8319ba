#!/usr/bin/env python3
"""The layer rule of docs/ARCHITECTURE.md, checked over the imports of src/ (tests aside).

    python3 tools/layers.py              # exit 0, or 1 with one line per violation
    python3 tools/layers.py --self-test  # plants a cycle and an upward import in a copy of src/

An import is any path into the crate outside comments, strings and `#[cfg(test)]` modules:
`use crate::…`, `use super::…`, a child module's `use child::…`, an inline `crate::a::f(…)` or
`child::f(…)`,
and `semshare::…` in the binary. A path is resolved to the file that defines the name, through
`pub use` re-exports. A module's own `pub use child::…` is its facade, not a dependency of its
code, so it ties nothing. Fails on:
  - an import from a higher floor (FLOORS below, the table of docs/ARCHITECTURE.md);
  - a cycle between top-level modules (e.g. `train` -> `experiment` -> `train`);
  - a cycle between files (e.g. `experiment/report.rs` <-> `experiment/suite.rs`).
Each message names the files and the imported names that tie them. It also fails on a source
file of src/ over MAX_LINES lines, its `#[cfg(test)]` modules aside.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

# Floor of each top-level module, from the bottom (docs/ARCHITECTURE.md). Imports go down or
# sideways on one floor (without a cycle), never up.
FLOORS = {
    "error": 0, "rng": 0, "io": 0, "cli": 0,
    "tensor": 1,
    "backend": 2,
    "nn": 3,
    "model": 4,
    "data": 5, "eval": 5, "checkpoint": 5,
    "train": 6, "inference": 6, "config": 6, "defaults": 6, "index": 6,
    "experiment": 7,
    "bin": 8,
}

EXTERNAL = {"std", "core", "alloc"}

# Longest a file of src/ may be, test modules aside: one concern fits on a few screens.
MAX_LINES = 800


def strip_code(text):
    """Source with comments and string/char literals blanked (newlines kept)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    out.append("\n" if text[i] == "\n" else "")
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:i + 8]) and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            end = n if end < 0 else end + 1 + len(hashes)
            out.append('""' + "\n" * text.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
        elif c == "'" and (re.match(r"'(\\.|\\u\{[0-9a-fA-F]+\}|[^\\'])'", text[i:i + 12])):
            m = re.match(r"'(\\.|\\u\{[0-9a-fA-F]+\}|[^\\'])'", text[i:i + 12])
            out.append("' '")
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def strip_test_modules(code, removed=None):
    """Blanks `#[cfg(test)] mod name { … }` blocks (newlines kept; `removed[0]` counts them)."""
    while True:
        m = re.search(r"#\[cfg\(test\)\]\s*(?:#\[[^\]]*\]\s*)*(pub(\([^)]*\))?\s+)?mod\s+\w+\s*([{;])", code)
        if not m:
            return code
        if m.group(3) == ";":
            code = code[: m.start()] + code[m.end():]
            continue
        depth, j = 1, m.end()
        while j < len(code) and depth:
            depth += {"{": 1, "}": -1}.get(code[j], 0)
            j += 1
        if removed is not None:
            removed[0] += code.count("\n", m.start(), j) + 1
        code = code[: m.start()] + "\n" * code.count("\n", m.start(), j) + code[j:]


def module_of(rel):
    """Module path (tuple) of a file under src/: src/a/b.rs -> (a, b); the binary is (bin, name, …)."""
    parts = rel[:-3].split("/")[1:]
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def use_trees(code):
    """(is_pub, path) for every leaf of every `use` statement: `use a::{b, c::d as e}`."""
    for m in re.finditer(r"(?:^|[;{}\s])(pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", code):
        tree = re.sub(r"\s+", "", re.sub(r"\s+as\s+", "@", m.group(2)))
        for path in expand(tree):
            yield bool(m.group(1)), path, m.start(2)


def expand(tree):
    depth = 0
    for i, c in enumerate(tree):
        if c == "{":
            if depth == 0:
                prefix, body = tree[:i], tree[i + 1: tree.rindex("}")]
                items, d, start = [], 0, 0
                for j, ch in enumerate(body):
                    d += {"{": 1, "}": -1}.get(ch, 0)
                    if ch == "," and d == 0:
                        items.append(body[start:j])
                        start = j + 1
                items.append(body[start:])
                out = []
                for it in items:
                    if it:
                        out += [prefix + x if x != "self" else prefix.rstrip(":") for x in expand(it)]
                return out
            depth += 1
    return [tree.split("@")[0]]  # `a::b as c` imports a::b


class Crate:
    def __init__(self, root):
        self.root = root
        self.files = {}  # module path -> relative file
        self.code = {}
        self.lines = {}  # relative file -> lines outside test modules
        for d, _, names in os.walk(os.path.join(root, "src")):
            for name in sorted(names):
                if name.endswith(".rs"):
                    rel = os.path.relpath(os.path.join(d, name), root).replace(os.sep, "/")
                    with open(os.path.join(root, rel), encoding="utf-8") as f:
                        text = f.read()
                    removed = [0]
                    self.code[rel] = strip_test_modules(strip_code(text), removed)
                    self.lines[rel] = text.count("\n") - removed[0]
                    self.files[module_of(rel)] = rel
        self.reexports = {rel: {} for rel in self.code}
        for rel, code in self.code.items():
            for is_pub, path, _ in use_trees(code):
                if is_pub:
                    absolute = self.absolute(rel, path)
                    if absolute:
                        self.reexports[rel][absolute[-1]] = absolute

    def crate_root(self, rel):
        mod = module_of(rel)
        return mod[:2] if mod[:1] == ("bin",) else ()

    def absolute(self, rel, path):
        """The crate-absolute segments of `path` as written in file `rel`, or None (external)."""
        segs = [s for s in path.split("::") if s]
        if not segs:
            return None
        mod = module_of(rel)
        if segs[0] == "crate":
            return self.crate_root(rel) + tuple(segs[1:])
        if segs[0] == "semshare" and mod[:1] == ("bin",):
            return tuple(segs[1:])
        if segs[0] in ("super", "self"):
            here = list(mod)
            while segs and segs[0] in ("super", "self"):
                if segs.pop(0) == "super":
                    here.pop()
            return tuple(here) + tuple(segs)
        if mod + (segs[0],) in self.files and segs[0] not in EXTERNAL:
            return mod + tuple(segs)  # a child module, by its relative name
        return None

    def resolve(self, absolute, seen=()):
        """(file, name) that defines `absolute`, following `pub use` re-exports."""
        for k in range(len(absolute), -1, -1):
            if absolute[:k] in self.files:
                rel = self.files[absolute[:k]]
                name = absolute[k] if k < len(absolute) else "self"
                target = self.reexports[rel].get(name)
                if target and target != absolute and target not in seen and name not in ("*", "self"):
                    return self.resolve(target + absolute[k + 1:], seen + (absolute,))
                return rel, name
        return None, None

    def edges(self):
        """{(from file, to file): set of names}, facades (a module's `pub use child::…`) aside."""
        out = {}
        for rel, code in self.code.items():
            mod = module_of(rel)
            found = []
            for is_pub, path, _ in use_trees(code):
                a = self.absolute(rel, path)
                if a is None or (is_pub and a[: len(mod)] == mod and len(a) > len(mod)):
                    continue  # external, or a re-export of this module's own child: a facade
                found.append(a)
            no_use = re.sub(r"(?:^|[;{}\s])(pub(?:\([^)]*\))?\s+)?use\s+[^;]+;", " ", code)
            for m in re.finditer(r"(?<![\w:])((?:crate|super|semshare|\w+)(?:::(?:super|\w+))+)", no_use):
                a = self.absolute(rel, m.group(1))
                if a is not None:
                    found.append(a)
            for a in found:
                to, name = self.resolve(a)
                if to and to != rel:
                    out.setdefault((rel, to), set()).add(name if name != "self" else "::".join(a))
        return out


def top(rel):
    mod = module_of(rel)
    return mod[0] if mod else "lib"


def cycles(nodes, edges):
    """The strongly connected components with more than one node (Tarjan), each as a list."""
    succ = {n: sorted({b for (a, b) in edges if a == n}) for n in nodes}
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in succ[v]:
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
                comps.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return comps


def check(root):
    crate = Crate(root)
    edges = crate.edges()
    problems = []
    for rel in sorted(crate.code):
        if top(rel) not in FLOORS and rel != "src/lib.rs":
            problems.append(f"{rel}: module `{top(rel)}` has no floor in tools/layers.py (docs/ARCHITECTURE.md)")
    for rel, n in sorted(crate.lines.items()):
        if n > MAX_LINES:
            problems.append(f"{rel}: {n} lines outside its test module (at most {MAX_LINES}): split it by concern")
    for (a, b), names in sorted(edges.items()):
        ta, tb = top(a), top(b)
        if a != "src/lib.rs" and ta in FLOORS and tb in FLOORS and FLOORS[tb] > FLOORS[ta]:
            problems.append(
                f"upward import: {a} ({ta}, floor {FLOORS[ta]}) imports {', '.join(sorted(names))} "
                f"from {b} ({tb}, floor {FLOORS[tb]})"
            )
    module_edges = {}
    for (a, b), names in edges.items():
        if top(a) != top(b) and a != "src/lib.rs":
            module_edges.setdefault((top(a), top(b)), []).append(f"{a} -> {b}: {', '.join(sorted(names))}")
    for comp in cycles({m for e in module_edges for m in e}, module_edges):
        circle = shortest_circle(comp, module_edges)
        ties = [t for a, b in zip(circle, circle[1:]) for t in module_edges[(a, b)]]
        problems.append(f"module cycle {' -> '.join(circle)}:\n    " + "\n    ".join(ties))
    for comp in cycles(set(crate.code), edges):
        circle = shortest_circle(comp, edges)
        ties = [f"{a} -> {b}: {', '.join(sorted(edges[(a, b)]))}" for a, b in zip(circle, circle[1:])]
        problems.append(f"file cycle {' -> '.join(circle)}:\n    " + "\n    ".join(ties))
    return problems


def shortest_circle(comp, edges):
    """The shortest closed path inside a strongly connected component: [a, b, …, a]."""
    inside = set(comp)
    best = None
    for start in sorted(comp):
        paths, frontier = {start: [start]}, [start]
        while frontier and not (best and len(paths[frontier[0]]) >= len(best)):
            nxt = []
            for v in frontier:
                for (a, b) in sorted(edges):
                    if a != v or b not in inside:
                        continue
                    if b == start:
                        circle = paths[v] + [start]
                        if best is None or len(circle) < len(best):
                            best = circle
                    elif b not in paths:
                        paths[b] = paths[v] + [b]
                        nxt.append(b)
            frontier = nxt
    return best


def self_test():
    """A clean copy passes; each planted bug is reported by file and name."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    plants = [
        # (file, line to append, what the report must contain)
        ("src/eval/linalg.rs", "use crate::eval::cca::Cca;", ["file cycle", "src/eval/cca.rs", "src/eval/linalg.rs", "Cca"]),
        ("src/nn/linear.rs", "fn f() { let _ = crate::train::MAX_BATCH; }", ["upward import: src/nn/linear.rs", "MAX_BATCH", "src/train/config.rs"]),
        ("src/eval/linalg.rs", "use crate::data::Dataset;", ["module cycle data -> eval -> data", "Dataset", "Side"]),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(os.path.join(here, "src"), os.path.join(tmp, "src"))
        base = check(tmp)
        assert not base, "the clean tree fails:\n" + "\n".join(base)
        # Comments, strings and test modules are not imports.
        probe = os.path.join(tmp, "src/error.rs")
        with open(probe, "a") as f:
            f.write('\n// use crate::train::X;\nconst _S: &str = "crate::train::X";\n'
                    "#[cfg(test)]\n#[allow(unused)]\nmod tests {\n    use crate::train::X;\n}\n")
        assert not check(tmp), "a comment, string or test module was read as an import"
        for rel, line, want in plants:
            with open(os.path.join(tmp, rel)) as f:
                original = f.read()
            if "crate::data::" in line:  # a module cycle needs an edge back: data imports eval
                with open(os.path.join(tmp, "src/data/loader.rs"), "a") as f:
                    f.write("\nuse crate::eval::metrics::Side;\n")
            with open(os.path.join(tmp, rel), "a") as f:
                f.write("\n" + line + "\n")
            report = "\n".join(check(tmp))
            missing = [w for w in want if w not in report]
            assert not missing, f"planted `{line}` in {rel}; report lacks {missing}:\n{report}"
            with open(os.path.join(tmp, rel), "w") as f:
                f.write(original)
        # The command itself exits 1 on a planted cycle.
        with open(os.path.join(tmp, "src/eval/linalg.rs"), "a") as f:
            f.write("\nuse crate::eval::cca::Cca;\n")
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--root", tmp], capture_output=True, text=True)
        assert r.returncode == 1 and "file cycle" in r.stdout, r.stdout + r.stderr
    print("layers self-test: ok (clean tree passes; planted file cycle, module cycle and upward import fail)")


def main(argv):
    if "--self-test" in argv:
        self_test()
        return 0
    root = argv[argv.index("--root") + 1] if "--root" in argv else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    problems = check(root)
    for p in problems:
        print(p)
    if problems:
        print(f"layers: {len(problems)} violation(s) of docs/ARCHITECTURE.md")
        return 1
    print("layers: ok (no cycle, no upward import)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
