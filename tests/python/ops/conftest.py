import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from op_testing import device  # noqa: E402


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def dev(request):
    """The cpu backend with one and with two threads: results must not depend on the split."""
    return device("cpu", request.param)
