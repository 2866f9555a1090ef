import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from metal_engine import _core  # noqa: E402

if not hasattr(_core, "metal_sim"):
    pytest.skip("this build has no metal-sim (METAL_ENGINE_METAL_SIM=OFF or an Apple host)", allow_module_level=True)
