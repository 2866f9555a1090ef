"""tools/msl_check.py: code Apple's Metal compiler would refuse fails here too (metal-sim compiles the kernels as
C++ with the address spaces defined away, so it cannot). Known-bad kernels each fail naming the problem; a good
one and every kernel of metal/ pass."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import msl_check  # noqa: E402

CLANG = msl_check.find_clang()
pytestmark = pytest.mark.skipif(CLANG is None, reason="no clang++ (apt-get install clang-19)")

HEAD = "#include <metal_stdlib>\nusing namespace metal;\n"
GOOD = HEAD + """
inline float first(device const float* p) { return p[0]; }
template <typename T>
kernel void scale(device const T* x [[buffer(0)]], device float* y [[buffer(1)]],
                  constant float& s [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  threadgroup float tile[32];
  tile[i % 32] = float(x[i]) * s;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[i] = tile[i % 32] + first(y);
}
template [[host_name("scale_f32")]] kernel decltype(scale<float>) scale<float>;
"""
BAD = {
    # a threadgroup pointer where a device pointer is expected
    "threadgroup_as_device": (HEAD + """
inline float first(device const float* p) { return p[0]; }
kernel void k(device float* y [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  threadgroup float tile[32];
  tile[i % 32] = 1.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[i] = first(tile);
}
""", "no matching function for call to 'first'"),
    # the same inside a template, caught because the host_name instantiation is instantiated
    "in_a_template": (HEAD + """
template <typename T> inline T first(device const T* p) { return p[0]; }
template <typename T>
kernel void k(device T* y [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  threadgroup T tile[32];
  tile[i % 32] = T(1);
  y[i] = first<T>(tile);
}
template [[host_name("k_f32")]] kernel decltype(k<float>) k<float>;
""", "no matching function for call to 'first'"),
    # a device reference bound to a thread one
    "device_as_thread_reference": (HEAD + """
inline void bump(thread float& v) { v += 1.0f; }
kernel void k(device float* y [[buffer(0)]], uint i [[thread_position_in_grid]]) { bump(y[i]); }
""", "no matching function for call to 'bump'"),
    "pointer_without_address_space": (HEAD + """
kernel void k(float* y [[buffer(0)]], uint i [[thread_position_in_grid]]) { y[i] = 0.0f; }
""", "pointer or reference parameter 'float* y' has no address space"),
    "buffer_bound_twice": (HEAD + """
kernel void k(device float* x [[buffer(1)]], device float* y [[buffer(1)]], uint i [[thread_position_in_grid]]) {
  y[i] = x[i];
}
""", "[[buffer(1)]] is bound twice"),
    "parameter_without_attribute": (HEAD + """
kernel void k(device float* y [[buffer(0)]], uint i) { y[i] = 0.0f; }
""", "parameter 'uint i' has no attribute"),
    "standard_library": (HEAD + """
kernel void k(device float* y [[buffer(0)]], uint i [[thread_position_in_grid]]) { y[i] = std::max(y[i], 0.0f); }
""", "the C++ standard library (std::) is not in MSL"),
    "include": ("#include <vector>\n" + HEAD + """
kernel void k(device float* y [[buffer(0)]], uint i [[thread_position_in_grid]]) { y[i] = 0.0f; }
""", "#include <vector>: MSL has only the metal_* headers"),
    "allocation": (HEAD + """
kernel void k(device float* y [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  float* t = new float[4];
  y[i] = t[0];
}
""", "dynamic allocation is not in MSL"),
    "exceptions": (HEAD + """
kernel void k(device float* y [[buffer(0)]], uint i [[thread_position_in_grid]]) { if (i > 9) throw 1; y[i] = 0; }
""", "exceptions are not in MSL"),
}


def check(tmp_path, name, text):
    f = tmp_path / f"{name}.metal"
    f.write_text(text)
    return subprocess.run([sys.executable, str(ROOT / "tools" / "msl_check.py"), "--clang", CLANG, str(f)],
                          capture_output=True, text=True)


def test_a_good_kernel_passes(tmp_path):
    r = check(tmp_path, "good", GOOD)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", list(BAD))
def test_known_bad_kernels_fail_naming_the_problem(tmp_path, name):
    text, message = BAD[name]
    r = check(tmp_path, name, text)
    assert r.returncode == 1, (name, r.stdout, r.stderr)
    assert message in r.stdout, r.stdout
    assert f"{name}.metal:" in r.stdout  # where


def test_every_kernel_of_the_engine_passes():
    files = sorted(str(p) for p in (ROOT / "metal").glob("*.metal")) + [str(ROOT / "metal" / "quant_blocks.h")]
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "msl_check.py"), "--clang", CLANG, *files],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
