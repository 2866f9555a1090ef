"""Makes the cpu backend's BLAS (libscipy_openblas from the scipy-openblas32 package) loadable before the
extension is imported, whatever the install layout; the extension's rpath covers the usual one."""

import ctypes
import os
import sys

if sys.platform != "darwin":
    try:
        import scipy_openblas32 as _openblas

        ctypes.CDLL(os.path.join(_openblas.get_lib_dir(), f"lib{_openblas.get_library()}.so"), mode=ctypes.RTLD_GLOBAL)
    except (ImportError, OSError):
        pass  # a build without it uses its own GEMM
