"""The op table (src/core/op_table.h) is the list the op tests are checked against: every op has its cpu test
against float64 numpy (tests/python/ops/) and its metal-sim test against the cpu op, the backends have every
kernel it names, and nothing else."""

import pathlib

import pytest

from metal_engine import _core

HERE = pathlib.Path(__file__).parent
OPS = _core.ops.op_table()


def mentions(path, op):
    """Whether a test file launches the op: its kernel name as a string literal (plain or an f-string prefix)."""
    text = path.read_text()
    return any(s in text for s in (f'"{op}"', f'"{op}_', f'f"{op}_', f'"{op}" +', f'"{op}{{'))


@pytest.mark.parametrize("op", [o for o in OPS if not o["metal_only"]], ids=lambda o: o["name"])
def test_every_op_has_a_cpu_test(op):
    files = sorted((HERE / "ops").glob("test_*.py"))
    assert any(mentions(f, op["name"]) for f in files), f"no test in tests/python/ops/ launches {op['name']}"


@pytest.mark.parametrize("op", OPS, ids=lambda o: o["name"])
def test_every_op_has_a_metal_sim_test(op):
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
