"""What Apple's Metal compiler would refuse and metal-sim cannot see (it compiles the kernels as C++ with
device, threadgroup and constant defined away), checked on any machine with clang:

  - address spaces: each file through clang -fsyntax-only against tools/msl_check/include, where device,
    constant and threadgroup are distinct clang address spaces, every `host_name` instantiation instantiated
    (so template bodies are checked with their real types): a threadgroup pointer passed where a device one
    is expected, a device reference bound where a thread one is, ... fail;
  - kernel parameters: every pointer or reference parameter of a kernel in an address space (device,
    constant, threadgroup), every parameter with an attribute, [[buffer(n)]] indices unique per kernel;
  - MSL's restrictions: no exceptions, RTTI, virtual functions, dynamic allocation, goto, C++ standard
    library (std::), recursion aside; includes only <metal_*> and the headers beside the file.

    python tools/msl_check.py [--clang CLANG] [--stamp FILE] file.metal|header.h ...

Prints each problem as file:line: message and exits 1 if there is any (the build runs it on metal/ and
fails); --stamp FILE is touched when all pass (the build's output)."""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from metal_prepass import FUNCTION_CONSTANT, split_params  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(HERE, "msl_check", "include")
INSTANTIATION = re.compile(
    r"template\s*\[\[\s*host_name\(\s*\"([^\"]+)\"\s*\)\s*\]\]\s*kernel\s+decltype\(([^)]*)\)\s*[^;]*;")
FORBIDDEN = [
    (r"\bstd\s*::", "the C++ standard library (std::) is not in MSL: use the metal_* headers"),
    (r"\bnew\b|\bdelete\b|\b(?:malloc|calloc|realloc|free)\s*\(", "dynamic allocation is not in MSL"),
    (r"\bthrow\b|\btry\b|\bcatch\b", "exceptions are not in MSL"),
    (r"\btypeid\b|\bdynamic_cast\b", "RTTI is not in MSL"),
    (r"\bvirtual\b", "virtual functions are not in MSL"),
    (r"\bgoto\b", "goto is not in MSL"),
]
ADDRESS_SPACES = ("device", "constant", "threadgroup")


def blank(text):
    """Comments and string literals blanked (newlines kept, so line numbers hold)."""
    def keep_lines(m):
        return re.sub(r"[^\n]", " ", m.group(0))
    return re.sub(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\])*"', keep_lines, text, flags=re.S)


def line_of(text, pos):
    return text.count("\n", 0, pos) + 1


def kernels(code):
    """(name, parameter text, offset) of each `kernel void name(...)`."""
    for m in re.finditer(r"\bkernel\s+void\s+(\w+)\s*\(", code):
        i, depth = m.end(), 1
        while depth and i < len(code):
            depth += {"(": 1, ")": -1}.get(code[i], 0)
            i += 1
        yield m.group(1), code[m.end(): i - 1], m.end()


def source_problems(path, text):
    """The restrictions a regex can see: includes, forbidden constructs, kernel parameters."""
    problems = []
    here = os.path.dirname(os.path.abspath(path))
    for m in re.finditer(r'(?m)^\s*#\s*include\s*([<"])([^>"]+)[>"]', text):
        kind, name = m.group(1), m.group(2)
        ok = name.startswith("metal_") if kind == "<" else os.path.exists(os.path.join(here, name))
        if not ok:
            shown = f"<{name}>" if kind == "<" else f'"{name}"'
            problems.append((line_of(text, m.start()), f"#include {shown}: MSL has only the metal_* headers "
                                                        "(and headers beside the kernels)"))
    code = blank(text)
    code_no_includes = re.sub(r"(?m)^\s*#\s*include[^\n]*", "", code)
    for pattern, why in FORBIDDEN:
        for m in re.finditer(pattern, code_no_includes):
            problems.append((line_of(code, m.start()), f"'{m.group(0).strip()}': {why}"))
    for name, params, offset in kernels(code):
        seen = {}
        for p in split_params(params):
            attr = re.search(r"\[\[\s*([a-z_]+)\s*(?:\(\s*(\d+)\s*\))?\s*\]\]", p)
            where = line_of(code, offset + params.find(p))
            decl = re.sub(r"\[\[.*?\]\]", "", p).strip()
            if not attr:
                problems.append((where, f"kernel {name}: parameter '{decl}' has no attribute ([[buffer(n)]], "
                                        "[[threadgroup(n)]] or a thread-position builtin)"))
                continue
            if ("*" in decl or "&" in decl) and not any(re.search(rf"\b{a}\b", decl) for a in ADDRESS_SPACES):
                problems.append((where, f"kernel {name}: pointer or reference parameter '{decl}' has no address "
                                        "space (device, constant or threadgroup)"))
            if attr.group(1) in ("buffer", "threadgroup") and attr.group(2) is not None:
                key = (attr.group(1), attr.group(2))
                if key in seen:
                    problems.append((where, f"kernel {name}: [[{key[0]}({key[1]})]] is bound twice ('{seen[key]}' "
                                            f"and '{decl}')"))
                seen[key] = decl
    return problems


def as_checked_cpp(path, text):
    """The file as C++ for clang: attributes stripped, each host_name instantiation taken by address (which
    instantiates it), threadgroup locals static (an address space on an automatic variable is not C++),
    function constants initialised."""
    n = [0]

    def instantiate(m):
        n[0] += 1
        return f"static auto* const me_msl_check_{n[0]} = &{m.group(2).strip()};"

    out = INSTANTIATION.sub(instantiate, text)
    out = FUNCTION_CONSTANT.sub(lambda m: f"constant {m.group(1)} {m.group(2)} = {{}};", out)
    out = re.sub(r"\[\[[^\]]*\]\]", "", out)
    out = re.sub(r"(?m)^(\s*)threadgroup\s+([^;(]+?)\s+(\w+)\s*(\[[^;]*\])\s*;", r"\1static threadgroup \2 \3\4;", out)
    out = re.sub(r"\b(\d+\.\d*)h\b", r"half(\1f)", out)
    return f'#line 1 "{path}"\n' + out


def clang_problems(path, text, clang):
    with tempfile.TemporaryDirectory() as tmp:
        cpp = os.path.join(tmp, os.path.basename(path) + ".cpp")
        with open(cpp, "w") as f:
            f.write(as_checked_cpp(path, text))
        r = subprocess.run([clang, "-std=c++17", "-fsyntax-only", "-fno-exceptions", "-fno-rtti", "-ferror-limit=50",
                            "-D__METAL_VERSION__=300", "-I", INCLUDE, "-I", os.path.dirname(os.path.abspath(path)),
                            cpp], capture_output=True, text=True)
    return [line for line in r.stderr.splitlines() if ": error:" in line]


def find_clang():
    for name in ("clang++-19", "clang++-18", "clang++-17", "clang++-16", "clang++"):
        if shutil.which(name):
            return name
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--clang", default=None, help="clang++ to run (default: the newest on PATH)")
    ap.add_argument("--stamp", default=None, help="a file touched when every check passes")
    a = ap.parse_args(argv)
    clang = a.clang or find_clang()
    if clang is None:
        print("msl_check: no clang++ on PATH (apt-get install clang-19)", file=sys.stderr)
        return 2
    failed = 0
    for path in a.files:
        text = open(path).read()
        problems = [f"{path}:{ln}: {msg}" for ln, msg in source_problems(path, text)]
        if path.endswith(".metal"):
            problems += clang_problems(path, text, clang)
        for p in problems:
            print(p)
        failed += len(problems)
    if failed:
        print(f"msl_check: {failed} problem(s): code Apple's Metal compiler would refuse", file=sys.stderr)
        return 1
    if a.stamp:
        with open(a.stamp, "w") as f:
            f.write("ok\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
