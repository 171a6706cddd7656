"""Triton kernels of fastmask (imported as ``fastmask.kernels``, never as a top-level module).

Each op exposes ``<op>_fwd`` / ``<op>_bwd`` launchers with the signatures that
:mod:`fastmask.ops` calls; see the op modules there for the autograd wiring.
"""
import triton  # noqa: F401  (an ImportError here tells the dispatcher Triton is unavailable)


def unavailable_reason():
    return None
