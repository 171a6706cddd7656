"""Numerical constants shared by the reference (fastmask.ops.reference) and the Triton kernels
(fastmask.kernels): one home, low enough for every layer to import. The CUDA C++ sources
cannot import them: csrc/loss.cu spells MAE_EPS as ``kMaeEps``, and LN_EPS arrives there as
the ``eps`` argument of the norm launchers."""

#: LayerNorm epsilon of DiT's norms (no affine parameters; statistics in fp32)
LN_EPS = 1e-6
#: epsilon in the MAE target's per-token normalisation, (x - mean) / sqrt(var + MAE_EPS)
MAE_EPS = 1e-6
#: RMSNorm epsilon of the block norms (LightningDiT models/rmsnorm.py: RMSNorm(dim, eps=1e-6))
RMS_EPS = 1e-6
#: epsilon of the per-head q/k RMSNorm (LightningDiT and SPRINT: eps 1e-6)
QK_NORM_EPS = 1e-6
