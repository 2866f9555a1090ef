import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "ops"))  # the op cases

from metal_engine import _core  # noqa: E402

if not hasattr(_core, "metal_sim") and "metal" not in _core.available_backends():
    pytest.skip("this build has neither metal-sim nor a Metal backend", allow_module_level=True)
