#!/usr/bin/env python3
"""Checks that every `simd::vectorised!` site of a release binary was compiled for its path.

    python3 tools/check_vectorised.py [BINARY ...]   (default: target/release/semshare)

`vectorised!` (src/backend/cpu/simd.rs) runs a closure inside a function compiled with the
path's features (`simd::avx2`, `simd::avx512`); the closure's body is vectorised for the path
only if LLVM inlines it there. When it does not, the closure stays a function of its own,
compiled for the baseline (SSE2, libm `floorf`): attention's softmax did in one build of session
14, 1.7x slower, with nothing failing. This lists, from `objdump -d`, every `simd::avx2` or
`simd::avx512` instance that calls or jumps to a closure instead of holding its body, and exits
1 if there is one. Build with `cargo build --release` (or `cargo bench --no-run`) first.
"""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = re.compile(r"^[0-9a-f]+ <(.*)>:$")
BRANCH = re.compile(r"\s(call|jmp)\s+[0-9a-f]+ <([^+>]*)")
WRAPPERS = ("semshare::backend::cpu::simd::avx2", "semshare::backend::cpu::simd::avx512")


def out_of_line(binary):
    """(wrapper, closure) for each wrapper instance that branches to a closure."""
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", binary], capture_output=True, text=True)
    if dis.returncode != 0:
        sys.exit(f"objdump -d {binary} failed: {dis.stderr.strip()}")
    found, current, wrappers = [], None, 0
    for line in dis.stdout.splitlines():
        header = HEADER.match(line)
        if header:
            current = header.group(1)
            wrappers += current in WRAPPERS
            continue
        branch = BRANCH.search(line)
        if current in WRAPPERS and branch and "{{closure}}" in branch.group(2):
            found.append((current.rsplit("::", 1)[1], branch.group(2)))
    return found, wrappers


def main():
    binaries = sys.argv[1:] or [os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "semshare")]
    failed = False
    for binary in binaries:
        if not os.path.isfile(binary):
            sys.exit(f"{binary}: no such binary (cargo build --release)")
        found, wrappers = out_of_line(binary)
        if wrappers == 0:
            sys.exit(f"{binary}: no simd::avx2 or simd::avx512 function in it (not an x86-64 semshare build?)")
        for wrapper, closure in found:
            print(f"{binary}: simd::{wrapper} calls {closure} out of line: its body is compiled for the baseline")
        print(f"{binary}: {wrappers} path functions, {len(found)} with their body out of line")
        failed |= bool(found)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
