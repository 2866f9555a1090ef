import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tiny_models import ARCHS, make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_checkpoint(root / arch, arch) for arch in ARCHS}
