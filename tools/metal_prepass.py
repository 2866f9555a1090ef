"""metal-sim's pre-pass: turns a .metal file into C++ that compiles against src/metal_sim/include.

What a header cannot do is done here: `constant T name [[function_constant(i)]];` becomes a file global that
every kernel of the file registers as its constant i (a thread_local, set by each dispatch); `[[...]]` attributes are stripped; `threadgroup T x[N];` locals
become `static thread_local`, declared to the runtime (which holds their total to 32 KB) (one copy per threadgroup, since a threadgroup's threads run as fibers on one
OS thread); each `kernel` and each `template [[host_name("...")]]` instantiation gets an entry point that
binds `[[buffer(n)]]` parameters and thread-position builtins by attribute (types come from the function's
own type), registered by name with the runtime.

    python tools/metal_prepass.py in.metal out.cpp

Two more outputs for the Metal backend:

    python tools/metal_prepass.py --embed out.cpp op_args.h quant_blocks.h a.metal b.metal ...
        the MSL source of every kernel in one C++ string (kMetalKernelSource), op_args.h inlined: what the
        backend compiles at run time when it finds no metallib
    python tools/metal_prepass.py --library out.metallib a.metal b.metal ...
        metal-sim's "metallib": a header line and the name of every kernel, which metal-sim's Metal
        stand-in loads as Apple's Metal loads a real one (the kernels themselves are compiled in)
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


def host_names(src):
    inst = re.compile(r"template\s*\[\[\s*host_name\(\s*\"([^\"]+)\"\s*\)\s*\]\]\s*kernel\s+decltype\(([^)]*)\)")
    names = [m.group(1) for m in inst.finditer(src)]
    templated = {m.group(2).split("<")[0].strip() for m in inst.finditer(src)}
    names += [m.group(1) for m in re.finditer(r"kernel\s+void\s+(\w+)\s*\(", src) if m.group(1) not in templated]
    return names


def section(text):
    """A file as the embedded source holds it: local #include lines and #pragma once dropped (the headers are
    inlined before the kernels)."""
    return re.sub(r'(?m)^(#pragma once|#include "[^"]+")[ \t]*$', "", text)


def fnv1a64(text):
    h = 1469598103934665603
    for c in text.encode():
        h = ((h ^ c) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


def embed(paths):
    """The headers (*.h, in the order given) then the kernel files as one MSL source, each as a section
    `// ---- name ----` (metal-sim checks each against the text its kernels were built from)."""
    headers = [p for p in paths if p.endswith(".h")]
    text = ""
    for path in headers + [p for p in paths if not p.endswith(".h")]:
        text += f"\n// ---- {path.split('/')[-1]} ----\n"
        text += section(open(path).read())
    return ('// Generated by tools/metal_prepass.py --embed from metal/*.metal: do not edit.\n'
            '#include "metal_kernels.h"\n'
            f'const char* const metal_engine::kMetalKernelSource = R"ME_MSL({text})ME_MSL";\n')


FUNCTION_CONSTANT = re.compile(r"constant\s+(\w+)\s+(\w+)\s*\[\[\s*function_constant\(\s*(\d+)\s*\)\s*\]\]\s*;")


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
    constants = [(m.group(2), int(m.group(3))) for m in FUNCTION_CONSTANT.finditer(src)]
    hosts = [m.group(1) for m in inst.finditer(src)]
    hosts += [m.group(1) for m in re.finditer(r"kernel\s+void\s+(\w+)\s*\(", src) if m.group(1) not in templated]
    for name, index in constants:
        # thread_local (a dispatch runs on one OS thread): set through a function, so each thread sets its own
        entries.append(f"static void me_sim_set_{name}(const void* v) {{ std::memcpy(&{name}, v, sizeof({name})); }}\n")
        for host in hosts:
            ident = re.sub(r"\W", "_", host)
            entries.append(f"static const bool me_sim_constant_{ident}_{index} = metal_sim::register_function_constant("
                           f"\"{host}\", {index}, me_sim_set_{name}, sizeof({name}));\n")
    out = FUNCTION_CONSTANT.sub(lambda m: f"static thread_local {m.group(1)} {m.group(2)};", src)
    out = inst.sub("", out)
    out = re.sub(r"\[\[[^\]]*\]\]", "", out)
    # threadgroup arrays: one copy per OS thread (a threadgroup's fibers share it), declared to the runtime,
    # which holds their total to the device's threadgroup memory
    out = re.sub(r"(?m)^(\s*)threadgroup\s+([^;(]+?)\s+(\w+)\s*(\[[^;]*\])\s*;",
                 r"\1static thread_local \2 \3\4; metal_sim::declare_threadgroup_memory(\3, sizeof(\3));", out)
    out = re.sub(r"\b(\d+\.\d*)h\b", r"half(\1f)", out)
    return out + "\n// --- metal-sim entry points ---\n" + "\n".join(entries)


def anchor(stem):
    """A function the kernel registry calls, so a static library's linker keeps this file's kernels."""
    ident = re.sub(r"\W", "_", stem)
    return f'\nextern "C" void me_sim_link_{ident}() {{}}\n'



if __name__ == "__main__":
    if sys.argv[1] == "--embed":
        with open(sys.argv[2], "w") as f:
            f.write(embed(sys.argv[3:]))
        sys.exit(0)
    if sys.argv[1] == "--library":
        names = [n for path in sys.argv[3:] for n in host_names(open(path).read())]
        with open(sys.argv[2], "w") as f:
            f.write("metal-sim library 1\n" + "".join(n + "\n" for n in sorted(names)))
        sys.exit(0)
    src_path, out_path = sys.argv[1], sys.argv[2]
    with open(src_path) as f:
        src = f.read()
    import os

    sources = [(src_path.split("/")[-1], src)]  # the file and the local headers it includes
    for name in re.findall(r'(?m)^#include "([^"]+)"', src):
        with open(os.path.join(os.path.dirname(os.path.abspath(src_path)), name)) as h:
            sources.append((name, h.read()))
    registered = "".join(f'static const bool me_sim_source_{re.sub(r"[^A-Za-z0-9]", "_", n)} = '
                         f'metal_sim::register_source("{n}", {fnv1a64(section(t))}ULL);\n' for n, t in sources)
    with open(out_path, "w") as f:
        stem = src_path.split("/")[-1].rsplit(".", 1)[0]
        f.write(f'#line 1 "{src_path}"\n' + convert(src) + "\n" + registered + anchor(stem))
