"""The op table (src/core/op_table.h) is the list the op tests are checked against: every op the cpu backend has
has cases in tests/python/ops/cases.py (run by test_backend_ops.py on every backend), every Metal-only op a test
in the metal-sim suite, every 16-bit-activation flavour a test in the 16-bit suite; the backends have every
kernel it names, and nothing else."""

import pathlib
import sys

import pytest

from metal_engine import _core

sys.path.insert(0, str(pathlib.Path(__file__).parent / "ops"))

HERE = pathlib.Path(__file__).parent
OPS = _core.ops.op_table()


def mentions(path, op):
    """Whether a test file launches the op: its kernel name as a string literal (plain or an f-string prefix)."""
    text = path.read_text()
    return any(s in text for s in (f'"{op}"', f'"{op}_', f'f"{op}_', f'"{op}" +', f'"{op}{{'))


def op_of(kernel):
    """The op a kernel name belongs to: the longest op name it starts with (as op_table.h's op_of_kernel)."""
    names = [o["name"] for o in OPS if kernel == o["name"] or kernel.startswith(o["name"] + "_")]
    return max(names, key=len) if names else None


@pytest.mark.parametrize("op", [o for o in OPS if not o["metal_only"]], ids=lambda o: o["name"])
def test_every_op_has_cases_for_every_kernel(op):
    """Every kernel of the op (each dtype flavour) has a case, run on the cpu and every other backend."""
    from cases import CASES

    kernels = {c.kernel for c in CASES if op_of(c.kernel) == op["name"]}
    assert set(op["cpu_kernels"]) <= kernels, f"no case in tests/python/ops/cases.py for {set(op['cpu_kernels']) - kernels}"


@pytest.mark.parametrize("op", OPS, ids=lambda o: o["name"])
def test_every_op_has_a_metal_sim_test(op):
    if op["metal_only"]:
        f32 = HERE / "metal_sim" / "test_metal_sim_kernels.py"
        assert mentions(f32, op["name"]), f"test_metal_sim_kernels.py does not launch {op['name']}"
    if any("_act_" in k for k in op["metal_kernels"]):
        half = HERE / "metal_sim" / "test_metal_kernels_16bit_activations.py"
        assert mentions(half, op["name"]), f"test_metal_kernels_16bit_activations.py does not launch {op['name']}"


def test_the_cpu_backend_has_every_kernel_of_the_table():
    names = set(_core.create_device("cpu", 1).kernel_names())
    want = {k for op in OPS for k in op["cpu_kernels"]}
    assert want <= names
    extra = names - want  # beyond the table's names: only the BLAS route of matmul (tested like macOS takes it)
    assert all(k.startswith("matmul_blas_") for k in extra), extra


def test_op_table_names_every_args_struct_the_bindings_have():
    structs = {op["args"] for op in OPS}
    assert all(hasattr(_core.ops, s) for s in structs)


def test_each_ops_written_buffers_are_the_ones_its_cases_check():
    """The op table's `writes` (what the Metal backend's barrier tracking takes a dispatch to write) against the
    op cases: every buffer a case checks as an output is in it, and every buffer in it is a case's output (or
    unbound, or a view of one). test_backend_ops.py runs each case with its other buffers unwritten."""
    from cases import CASES

    writes = {o["name"]: o["writes"] for o in OPS}
    seen = {}
    for c in CASES:
        op = op_of(c.kernel)
        mask = writes[op]
        for i in c.outputs:  # written as itself, or through a written buffer bound as a view of it (in place)
            through = [j for j, (base, _) in c.views.items() if base == i and mask >> j & 1]
            assert mask >> i & 1 or through, f"{c.id}: buffer {i} is an output but op_table.h's writes for {op} lack it"
        for i in range(len(c.buffers)):
            if mask >> i & 1 and c.buffers[i] is not None and i not in c.views:
                seen.setdefault(op, set()).add(i)
                assert i in c.outputs, f"{c.id}: op_table.h says {op} writes buffer {i}; the case reads it only"
    assert set(seen) == {op_of(c.kernel) for c in CASES}  # every op with cases was checked
