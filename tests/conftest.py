"""Test set-up: on a machine without a GPU, Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before triton decorates any kernel, so it is set here,
before fastmask is imported by any test module.
"""
import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

GPU_REASON = "needs a CUDA GPU (none visible to torch on this machine)"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped with a reason elsewhere")
    config.addinivalue_line("markers", "slow: longer CPU tests")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason=GPU_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return "cuda" if _HAS_CUDA else "cpu"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """fastmask reads its environment variables once (at import, and on reload); a test that
    changed them with monkeypatch has them restored by its teardown, so read them again after."""
    yield
    import sys

    env = sys.modules.get("fastmask._env")
    if env is not None:
        env.reload()
