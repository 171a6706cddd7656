// fastmask._C built for the CPU emulator (tests/test_cuda_ext.py): the real kernels and
// bindings of csrc/, one translation unit, CPU tensors in and out.
#define FASTMASK_CPU_EMULATION 1
#include "cuda_emu.h"

#include "tokens.cu"
#include "norm.cu"
#include "loss.cu"
#include "bindings.cpp"
