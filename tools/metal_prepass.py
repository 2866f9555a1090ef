"""metal-sim's pre-pass: turns a .metal file into C++ that compiles against src/metal_sim/include.

What a header cannot do is done here: `[[...]]` attributes are stripped; `threadgroup T x[N];` locals
become `static thread_local` (one copy per threadgroup, since a threadgroup's threads run as fibers on one
OS thread); each `kernel` and each `template [[host_name("...")]]` instantiation gets an entry point that
binds `[[buffer(n)]]` parameters and thread-position builtins by attribute (types come from the function's
own type), registered by name with the runtime.

    python tools/metal_prepass.py in.metal out.cpp
"""

import re
import sys

BUILTINS = {
    "thread_position_in_threadgroup": "bind_position<{T}>(c.thread_position_in_threadgroup)",
    "threadgroup_position_in_grid": "bind_position<{T}>(c.threadgroup_position_in_grid)",
    "thread_position_in_grid": "bind_position<{T}>(c.thread_position_in_grid)",
    "threads_per_threadgroup": "bind_position<{T}>(c.threads_per_threadgroup)",
    "threadgroups_per_grid": "bind_position<{T}>(c.threadgroups_per_grid)",
    "thread_index_in_threadgroup": "bind_index<{T}>(c.thread_index_in_threadgroup)",
    "thread_index_in_simdgroup": "bind_index<{T}>(c.thread_index_in_simdgroup)",
    "simdgroup_index_in_threadgroup": "bind_index<{T}>(c.simdgroup_index_in_threadgroup)",
}


def split_params(text):
    params, depth, cur = [], 0, ""
    for ch in text:
        if ch in "(<[":
            depth += 1
        elif ch in ")>]":
            depth -= 1
        if ch == "," and depth == 0:
            params.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        params.append(cur.strip())
    return params


def kernel_params(src, name):
    m = re.search(r"kernel\s+void\s+" + re.escape(name) + r"\s*\(", src)
    if not m:
        raise SystemExit(f"metal_prepass: kernel {name} not found")
    i, depth = m.end(), 1
    start = i
    while depth:
        depth += {"(": 1, ")": -1}.get(src[i], 0)
        i += 1
    attrs = []
    text = re.sub(r"//[^\n]*|/\*.*?\*/", "", src[start : i - 1], flags=re.S)
    for p in split_params(text):
        a = re.search(r"\[\[\s*([a-z_]+)\s*(?:\(\s*(\d+)\s*\))?\s*\]\]", p)
        if not a:
            raise SystemExit(f"metal_prepass: parameter '{p}' of {name} has no attribute")
        attrs.append((a.group(1), a.group(2)))
    return attrs


def entry(host, fn, attrs):
    args = []
    for idx, (kind, n) in enumerate(attrs):
        T = f"P::arg<{idx}>"
        if kind == "buffer":
            args.append(f"metal_sim::bind_buffer<{T}>(c, {n})")
        elif kind in BUILTINS:
            args.append("metal_sim::" + BUILTINS[kind].format(T=T))
        else:
            raise SystemExit(f"metal_prepass: attribute [[{kind}]] of {host} is not supported")
    ident = re.sub(r"\W", "_", host)
    return (
        f"static void me_sim_entry_{ident}(const metal_sim::ThreadContext& c) {{\n"
        f"  using P = metal_sim::fn_traits<decltype(&{fn})>;\n"
        f"  (void)c;\n"
        f"  {fn}({', '.join(args)});\n"
        f"}}\n"
        f"static const bool me_sim_registered_{ident} = metal_sim::register_kernel(\"{host}\", me_sim_entry_{ident});\n"
    )


def convert(src):
    entries = []
    # template [[host_name("x")]] kernel decltype(f<T>) f<T>;
    inst = re.compile(r"template\s*\[\[\s*host_name\(\s*\"([^\"]+)\"\s*\)\s*\]\]\s*kernel\s+decltype\(([^)]*)\)\s*[^;]*;")
    for m in inst.finditer(src):
        host, fn = m.group(1), m.group(2).strip()
        base = fn.split("<")[0].strip()
        entries.append(entry(host, fn, kernel_params(src, base)))
    templated = {m.group(2).split("<")[0].strip() for m in inst.finditer(src)}
    for m in re.finditer(r"kernel\s+void\s+(\w+)\s*\(", src):
        if m.group(1) not in templated:
            entries.append(entry(m.group(1), m.group(1), kernel_params(src, m.group(1))))
    out = inst.sub("", src)
    out = re.sub(r"\[\[[^\]]*\]\]", "", out)
    out = re.sub(r"(?m)^(\s*)threadgroup\s+([^;(]+\[[^;]*\]\s*;)", r"\1static thread_local \2", out)
    out = re.sub(r"\b(\d+\.\d*)h\b", r"half(\1f)", out)
    return out + "\n// --- metal-sim entry points ---\n" + "\n".join(entries)


if __name__ == "__main__":
    src_path, out_path = sys.argv[1], sys.argv[2]
    with open(src_path) as f:
        src = f.read()
    with open(out_path, "w") as f:
        f.write(f'#line 1 "{src_path}"\n' + convert(src))
