// Python bindings of the fastmask CUDA kernels (module fastmask._C).
//
// Each function takes its outputs first (allocated by fastmask/cuda_ext.py with
// torch.empty), then its inputs; checks devices, shapes, dtypes and contiguity with clear
// messages; picks the element type (fp32 / fp16 / bf16) and the vectorised or scalar
// instantiation; allocates the internal buffers (id maps, fp32 partial sums); launches on
// the current stream. The kernels themselves live in the .cu files, which see no torch
// header (see fastmask_cuda.h).
#include <torch/extension.h>

#ifndef FASTMASK_CPU_EMULATION  // tests/cuda_emu builds this file against a CPU emulator
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <type_traits>

#include "fastmask_cuda.h"

namespace fm = fastmask;

namespace {

template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
struct TypeTag {
  using type = typename CudaType<T>::type;
};

// Calls f(TypeTag<T>{}) for T = float, at::Half, at::BFloat16 (the AT_DISPATCH_FLOATING_TYPES_AND2
// set without fp64, which has no kernels); any other dtype is refused with the op's name.
template <typename F>
void dispatch_float(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::ScalarType::Float:
      f(TypeTag<float>{});
      break;
    case at::ScalarType::Half:
      f(TypeTag<at::Half>{});
      break;
    case at::ScalarType::BFloat16:
      f(TypeTag<at::BFloat16>{});
      break;
    default:
      TORCH_CHECK(false, "fastmask.", op, ": dtype ", st, " is not supported (float32, float16, bfloat16)");
  }
}

using OptTensor = std::optional<at::Tensor>;

// ---------------------------------------------------------------- compile-time switches
// Each runs the lambda given as its last argument with a runtime choice turned into a
// constant the lambda can use as a template argument, and yields the lambda's result:
//   FASTMASK_VEC_SWITCH(vec, [&] { return kernel<T, VEC>(...); })
// instantiates kernel<T, kVec<T>> (16-byte vectors) when `vec` and kernel<T, 1> otherwise.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

#define FASTMASK_VEC_SWITCH(COND, ...)   \
  [&] {                                  \
    if (COND) {                          \
      constexpr int VEC = kVec<T>;       \
      return __VA_ARGS__();              \
    }                                    \
    constexpr int VEC = 1;               \
    return __VA_ARGS__();                \
  }()

#define FASTMASK_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                       \
    if (COND) {                               \
      constexpr bool NAME = true;             \
      return __VA_ARGS__();                   \
    }                                         \
    constexpr bool NAME = false;              \
    return __VA_ARGS__();                     \
  }()

#define FASTMASK_NORM_MODE_SWITCH(MODE_VALUE, NAME, ...)                   \
  [&] {                                                                   \
    switch (MODE_VALUE) {                                                 \
      case fm::NormBwdMode::kLayerNorm: {                                 \
        constexpr fm::NormBwdMode NAME = fm::NormBwdMode::kLayerNorm;      \
        return __VA_ARGS__();                                             \
      }                                                                   \
      case fm::NormBwdMode::kResidualLayerNorm: {                         \
        constexpr fm::NormBwdMode NAME = fm::NormBwdMode::kResidualLayerNorm; \
        return __VA_ARGS__();                                             \
      }                                                                   \
      default: {                                                          \
        constexpr fm::NormBwdMode NAME = fm::NormBwdMode::kGatedResidual;  \
        return __VA_ARGS__();                                             \
      }                                                                   \
    }                                                                     \
  }()

#ifdef FASTMASK_CPU_EMULATION
constexpr bool kEmulated = true;
// The emulated kernels read and write CPU tensors; there is no device or stream.
struct DeviceScope {
  explicit DeviceScope(const at::Tensor&) {}
  cudaStream_t stream() const { return nullptr; }
};
#else
constexpr bool kEmulated = false;
// The tensors' device is current for the launches, which go to its current stream.
struct DeviceScope {
  explicit DeviceScope(const at::Tensor& t) : guard(t.device()) {}
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream(); }
  c10::cuda::CUDAGuard guard;
};
#endif

void check(const at::Tensor& t, const char* op, const char* name, const at::Tensor& ref,
           at::IntArrayRef shape, std::optional<at::ScalarType> dtype) {
  TORCH_CHECK(kEmulated ? t.is_cpu() : t.is_cuda(), "fastmask.", op, ": ", name, " must be a CUDA tensor, got device ",
              t.device());
  TORCH_CHECK(t.device() == ref.device(), "fastmask.", op, ": ", name, " is on ", t.device(),
              " but the first input is on ", ref.device());
  TORCH_CHECK(t.sizes() == shape, "fastmask.", op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  if (dtype.has_value()) {
    TORCH_CHECK(t.scalar_type() == *dtype, "fastmask.", op, ": ", name, " must have dtype ", *dtype, ", got ",
                t.scalar_type());
  }
  TORCH_CHECK(t.is_contiguous(), "fastmask.", op, ": ", name, " must be contiguous (call .contiguous() first)");
}

void check_float_param(const at::Tensor& t, const char* op, const char* name, const at::Tensor& ref,
                       at::IntArrayRef shape) {
  check(t, op, name, ref, shape, std::nullopt);
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "fastmask.", op, ": ", name,
              " must be float32, float16 or bfloat16, got ", st);
}

void check_rank(const at::Tensor& t, int64_t rank, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == rank, "fastmask.", op, ": ", name, " must be ", rank, "-d, got shape ", t.sizes());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastmask.", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}
template <typename T>
T* ptr(const OptTensor& t) {
  return t.has_value() ? reinterpret_cast<T*>(t->data_ptr()) : nullptr;
}

// The vectorised instantiation needs every row to start on a 16-byte boundary.
bool use_vec(int64_t D, int vec, std::initializer_list<const void*> ptrs) {
  if (D % vec != 0) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

int sm_count(const at::Tensor& t) {
  if (kEmulated) return 2;  // small, so that the emulated plans split batches and rows
  int n = 0;
  check_launch(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, t.get_device()), "sm_count");
  return n > 0 ? n : 1;
}

// out [G, W] (any float dtype) = the sum over j of in [G, J, W] (fp32), in a fixed order.
void reduce_into(const at::Tensor& out, at::Tensor in, int64_t G, int64_t J, int64_t W, cudaStream_t stream,
                 const char* op) {
  while (J > fm::kReduceFan) {
    const int64_t JB = fm::ceil_div(J, fm::kReduceFan);
    at::Tensor tmp = at::empty({G, JB, W}, in.options());
    check_launch(fm::reduce_middle<float>(ptr<float>(tmp), ptr<float>(in), G, J, W, fm::kReduceFan, stream), op);
    in = tmp;
    J = JB;
  }
  dispatch_float(out.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_launch(fm::reduce_middle<T>(ptr<T>(out), ptr<float>(in), G, J, W, J, stream), op);
  });
}

at::Tensor inverse_ids(const at::Tensor& ids, int64_t B, int64_t N, int64_t K, cudaStream_t stream, const char* op) {
  at::Tensor inv = at::empty({B, N}, ids.options().dtype(at::kInt));
  check_launch(fm::inverse_ids(ptr<int32_t>(inv), ptr<int64_t>(ids), B, N, K, stream), op);
  return inv;
}

// ------------------------------------------------------------------------ token ops
// The checks the token backwards share; true when there is nothing to launch (B * N * D ==
// 0), after zeroing the batch sums (grad_pos, and `sum` when given).
bool token_bwd_nothing_to_do(const char* op, const at::Tensor& grad_out, const at::Tensor& ids,
                             const OptTensor& grad_pos, const OptTensor& sum, int64_t B, int64_t N, int64_t K,
                             int64_t D) {
  check(ids, op, "ids_keep", grad_out, {B, K}, at::kLong);
  if (grad_pos.has_value()) check(*grad_pos, op, "grad_pos", grad_out, {N, D}, at::kFloat);
  TORCH_CHECK(K <= N, "fastmask.", op, ": ", K, " kept tokens of only ", N);
  if (B * N * D != 0) return false;
  for (const OptTensor* t : {&grad_pos, &sum}) {
    if (t->has_value()) (*t)->zero_();
  }
  return true;
}

// The fp32 per-split partials [splits, N, D] of grad_pos (grad_pos itself for one split), or
// none without a position gradient.
OptTensor pos_partials(const OptTensor& grad_pos, int64_t splits, int64_t N, int64_t D) {
  if (!grad_pos.has_value()) return std::nullopt;
  return splits == 1 ? *grad_pos : at::empty({splits, N, D}, grad_pos->options());
}

void gather_tokens_fwd(const at::Tensor& out, const at::Tensor& x, const at::Tensor& ids, const OptTensor& pos) {
  const char* op = "gather_tokens_fwd";
  check_rank(x, 3, op, "x");
  check_rank(ids, 2, op, "ids_keep");
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = ids.size(1);
  check(x, op, "x", x, {B, N, D}, std::nullopt);
  check(ids, op, "ids_keep", x, {B, K}, at::kLong);
  check(out, op, "out", x, {B, K, D}, x.scalar_type());
  if (pos.has_value()) check(*pos, op, "pos", x, {N, D}, at::kFloat);  // fp32: the add rounds once
  if (out.numel() == 0) return;
  const DeviceScope scope(x);
  const cudaStream_t stream = scope.stream();
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const float* p = ptr<float>(pos);
    const bool vec = use_vec(D, kVec<T>, {out.data_ptr(), x.data_ptr(), p});
    check_launch(FASTMASK_VEC_SWITCH(vec, [&] {
                   return fm::gather_tokens_fwd<T, VEC>(ptr<T>(out), ptr<T>(x), ptr<int64_t>(ids), p, B, N, K, D,
                                                        stream);
                 }),
                 op);
  });
}

void gather_tokens_bwd(const at::Tensor& grad_x, const OptTensor& grad_pos, const at::Tensor& grad_out,
                       const at::Tensor& ids) {
  const char* op = "gather_tokens_bwd";
  check_rank(grad_out, 3, op, "grad_out");
  check_rank(grad_x, 3, op, "grad_x");
  const int64_t B = grad_out.size(0), K = grad_out.size(1), D = grad_out.size(2), N = grad_x.size(1);
  check(grad_out, op, "grad_out", grad_out, {B, K, D}, std::nullopt);
  check(grad_x, op, "grad_x", grad_out, {B, N, D}, grad_out.scalar_type());
  if (token_bwd_nothing_to_do(op, grad_out, ids, grad_pos, std::nullopt, B, N, K, D)) return;
  const DeviceScope scope(grad_out);
  const cudaStream_t stream = scope.stream();
  const at::Tensor inv = inverse_ids(ids, B, N, K, stream, op);
  dispatch_float(grad_out.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool vec = use_vec(D, kVec<T>, {grad_x.data_ptr(), grad_out.data_ptr(), ptr<float>(grad_pos)});
    const int64_t chunks = D / (vec ? kVec<T> : 1);
    // Without a position gradient every (b, n) row is independent: one split per sample.
    const int64_t splits = grad_pos.has_value() ? fm::token_bwd_splits(B, N, chunks, sm_count(grad_out)) : B;
    const OptTensor pos_partial = pos_partials(grad_pos, splits, N, D);
    check_launch(FASTMASK_VEC_SWITCH(vec, [&] {
                   return fm::gather_tokens_bwd<T, VEC>(ptr<T>(grad_x), ptr<float>(pos_partial), ptr<T>(grad_out),
                                                        ptr<int32_t>(inv), B, N, K, D, splits, stream);
                 }),
                 op);
    if (splits > 1 && grad_pos.has_value()) reduce_into(*grad_pos, *pos_partial, 1, splits, N * D, stream, op);
  });
}

void unmask_tokens_fwd(const at::Tensor& out, const at::Tensor& x_vis, const at::Tensor& ids,
                       const at::Tensor& mask_token, const OptTensor& pos) {
  const char* op = "unmask_tokens_fwd";
  check_rank(x_vis, 3, op, "x_vis");
  check_rank(out, 3, op, "out");
  const int64_t B = x_vis.size(0), K = x_vis.size(1), D = x_vis.size(2), N = out.size(1);
  check(x_vis, op, "x_vis", x_vis, {B, K, D}, std::nullopt);
  check(ids, op, "ids_keep", x_vis, {B, K}, at::kLong);
  check(mask_token, op, "mask_token", x_vis, {D}, x_vis.scalar_type());
  check(out, op, "out", x_vis, {B, N, D}, x_vis.scalar_type());
  if (pos.has_value()) check(*pos, op, "pos", x_vis, {N, D}, at::kFloat);  // fp32: the add rounds once
  TORCH_CHECK(K <= N, "fastmask.", op, ": ", K, " kept tokens of only ", N);
  if (out.numel() == 0) return;
  const DeviceScope scope(x_vis);
  const cudaStream_t stream = scope.stream();
  const at::Tensor inv = inverse_ids(ids, B, N, K, stream, op);
  dispatch_float(x_vis.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const float* p = ptr<float>(pos);
    const bool vec = use_vec(D, kVec<T>, {out.data_ptr(), x_vis.data_ptr(), mask_token.data_ptr(), p});
    check_launch(FASTMASK_VEC_SWITCH(vec, [&] {
                   return fm::unmask_tokens_fwd<T, VEC>(ptr<T>(out), ptr<T>(x_vis), ptr<int32_t>(inv),
                                                        ptr<T>(mask_token), p, B, N, K, D, stream);
                 }),
                 op);
  });
}

void unmask_tokens_bwd(const at::Tensor& grad_x_vis, const at::Tensor& grad_mask, const OptTensor& grad_pos,
                       const at::Tensor& grad_out, const at::Tensor& ids) {
  const char* op = "unmask_tokens_bwd";
  check_rank(grad_out, 3, op, "grad_out");
  check_rank(ids, 2, op, "ids_keep");
  const int64_t B = grad_out.size(0), N = grad_out.size(1), D = grad_out.size(2), K = ids.size(1);
  check(grad_out, op, "grad_out", grad_out, {B, N, D}, std::nullopt);
  check(grad_x_vis, op, "grad_x_vis", grad_out, {B, K, D}, grad_out.scalar_type());
  check(grad_mask, op, "grad_mask_token", grad_out, {D}, at::kFloat);
  if (token_bwd_nothing_to_do(op, grad_out, ids, grad_pos, grad_mask, B, N, K, D)) return;
  const DeviceScope scope(grad_out);
  const cudaStream_t stream = scope.stream();
  const at::Tensor inv = inverse_ids(ids, B, N, K, stream, op);
  dispatch_float(grad_out.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool vec = use_vec(D, kVec<T>, {grad_x_vis.data_ptr(), grad_out.data_ptr(), ptr<float>(grad_pos)});
    const int64_t chunks = D / (vec ? kVec<T> : 1);
    const int64_t splits = fm::token_bwd_splits(B, N, chunks, sm_count(grad_out));
    const at::Tensor mask_partial = at::empty({splits, N, D}, grad_out.options().dtype(at::kFloat));
    const OptTensor pos_partial = pos_partials(grad_pos, splits, N, D);
    check_launch(FASTMASK_VEC_SWITCH(vec, [&] {
                   return fm::unmask_tokens_bwd<T, VEC>(ptr<T>(grad_x_vis), ptr<float>(mask_partial),
                                                        ptr<float>(pos_partial), ptr<T>(grad_out), ptr<int64_t>(ids),
                                                        ptr<int32_t>(inv), B, N, K, D, splits, stream);
                 }),
                 op);
    reduce_into(grad_mask, mask_partial, 1, splits * N, D, stream, op);
    if (splits > 1 && grad_pos.has_value()) reduce_into(*grad_pos, *pos_partial, 1, splits, N * D, stream, op);
  });
}

void scatter_tokens_fwd(const at::Tensor& out, const at::Tensor& x_kept, const at::Tensor& ids,
                        const OptTensor& fill) {
  const char* op = "scatter_tokens_fwd";
  check_rank(x_kept, 3, op, "x_kept");
  check_rank(out, 3, op, "out");
  const int64_t B = x_kept.size(0), K = x_kept.size(1), D = x_kept.size(2), N = out.size(1);
  check(x_kept, op, "x_kept", x_kept, {B, K, D}, std::nullopt);
  check(ids, op, "ids_keep", x_kept, {B, K}, at::kLong);
  // the launcher casts the fill to x_kept's dtype (a copy then); none: zeros
  if (fill.has_value()) check(*fill, op, "fill", x_kept, {B, N, D}, x_kept.scalar_type());
  check(out, op, "out", x_kept, {B, N, D}, x_kept.scalar_type());
  TORCH_CHECK(K <= N, "fastmask.", op, ": ", K, " kept tokens of only ", N);
  if (out.numel() == 0) return;
  const DeviceScope scope(x_kept);
  const cudaStream_t stream = scope.stream();
  const at::Tensor inv = inverse_ids(ids, B, N, K, stream, op);
  dispatch_float(x_kept.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* f = ptr<T>(fill);
    const bool vec = use_vec(D, kVec<T>, {out.data_ptr(), x_kept.data_ptr(), f});
    check_launch(FASTMASK_VEC_SWITCH(vec, [&] {
                   return fm::scatter_tokens_fwd<T, VEC>(ptr<T>(out), ptr<T>(x_kept), ptr<int32_t>(inv), f, B, N, K, D,
                                                         stream);
                 }),
                 op);
  });
}

// grad_fill given: one pass over grad_out writes both gradients; none: grad_x_kept is the
// gather of grad_out's kept rows (only they are read).
void scatter_tokens_bwd(const at::Tensor& grad_x_kept, const OptTensor& grad_fill, const at::Tensor& grad_out,
                        const at::Tensor& ids) {
  const char* op = "scatter_tokens_bwd";
  check_rank(grad_out, 3, op, "grad_out");
  check_rank(ids, 2, op, "ids_keep");
  const int64_t B = grad_out.size(0), N = grad_out.size(1), D = grad_out.size(2), K = ids.size(1);
  check(grad_out, op, "grad_out", grad_out, {B, N, D}, std::nullopt);
  check(ids, op, "ids_keep", grad_out, {B, K}, at::kLong);
  check(grad_x_kept, op, "grad_x_kept", grad_out, {B, K, D}, grad_out.scalar_type());
  if (grad_fill.has_value()) check(*grad_fill, op, "grad_fill", grad_out, {B, N, D}, grad_out.scalar_type());
  TORCH_CHECK(K <= N, "fastmask.", op, ": ", K, " kept tokens of only ", N);
  if (grad_out.numel() == 0) return;
  const DeviceScope scope(grad_out);
  const cudaStream_t stream = scope.stream();
  if (!grad_fill.has_value()) {
    if (grad_x_kept.numel() == 0) return;
    dispatch_float(grad_out.scalar_type(), op, [&](auto tag) {
      using T = typename decltype(tag)::type;
      const bool vec = use_vec(D, kVec<T>, {grad_x_kept.data_ptr(), grad_out.data_ptr()});
      check_launch(FASTMASK_VEC_SWITCH(vec, [&] {
                     return fm::gather_tokens_fwd<T, VEC>(ptr<T>(grad_x_kept), ptr<T>(grad_out), ptr<int64_t>(ids),
                                                          nullptr, B, N, K, D, stream);
                   }),
                   op);
    });
    return;
  }
  const at::Tensor inv = inverse_ids(ids, B, N, K, stream, op);
  dispatch_float(grad_out.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool vec = use_vec(D, kVec<T>, {grad_x_kept.data_ptr(), grad_fill->data_ptr(), grad_out.data_ptr()});
    check_launch(FASTMASK_VEC_SWITCH(vec, [&] {
                   return fm::scatter_tokens_bwd<T, VEC>(ptr<T>(grad_x_kept), ptr<T>(grad_fill), ptr<T>(grad_out),
                                                         ptr<int64_t>(ids), ptr<int32_t>(inv), B, N, K, D, stream);
                 }),
                 op);
  });
}

// ------------------------------------------------------------------------- norm ops
void ln_fwd_impl(const char* op, const OptTensor& x_new, const at::Tensor& out, const at::Tensor& mean,
                 const at::Tensor& rstd, const at::Tensor& x, const OptTensor& y, const OptTensor& gate,
                 const at::Tensor& shift, const at::Tensor& scale, double eps) {
  check_rank(x, 3, op, "x");
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  const auto st = x.scalar_type();
  check(x, op, "x", x, {B, L, D}, std::nullopt);
  check(out, op, "out", x, {B, L, D}, st);
  check(mean, op, "mean", x, {B * L}, at::kFloat);
  check(rstd, op, "rstd", x, {B * L}, at::kFloat);
  check(shift, op, "shift (fp32 in the launcher)", x, {B, D}, at::kFloat);
  check(scale, op, "scale (fp32 in the launcher)", x, {B, D}, at::kFloat);
  const bool residual = x_new.has_value();
  if (residual) {
    TORCH_CHECK(y.has_value() && gate.has_value(), "fastmask.", op, ": y and gate are required");
    check(*x_new, op, "x_new", x, {B, L, D}, st);
    check(*y, op, "y", x, {B, L, D}, st);
    check(*gate, op, "gate (fp32 in the launcher)", x, {B, D}, at::kFloat);
  }
  if (B * L == 0) return;
  TORCH_CHECK(D > 0, "fastmask.", op, ": LayerNorm over an empty last dimension");
  const DeviceScope scope(x);
  const cudaStream_t stream = scope.stream();
  fm::NormFwdArgs a{};
  a.out = out.data_ptr();
  a.x_new = residual ? x_new->data_ptr() : nullptr;
  a.mean = ptr<float>(mean);
  a.rstd = ptr<float>(rstd);
  a.x = x.data_ptr();
  a.y = residual ? y->data_ptr() : nullptr;
  a.gate = residual ? ptr<float>(*gate) : nullptr;
  a.shift = ptr<float>(shift);
  a.scale = ptr<float>(scale);
  a.B = B;
  a.L = L;
  a.D = D;
  a.eps = static_cast<float>(eps);
  dispatch_float(st, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool vec = use_vec(D, kVec<T>, {a.out, a.x_new, a.x, a.y, a.gate, a.shift, a.scale});
    check_launch(FASTMASK_BOOL_SWITCH(residual, RESIDUAL, [&] {
                   return FASTMASK_VEC_SWITCH(vec, [&] { return fm::layernorm_modulate_fwd<T, VEC, RESIDUAL>(a, stream); });
                 }),
                 op);
  });
}

void layernorm_modulate_fwd(const at::Tensor& out, const at::Tensor& mean, const at::Tensor& rstd,
                            const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps) {
  ln_fwd_impl("layernorm_modulate_fwd", std::nullopt, out, mean, rstd, x, std::nullopt, std::nullopt, shift, scale,
              eps);
}

void residual_layernorm_modulate_fwd(const at::Tensor& x_new, const at::Tensor& out, const at::Tensor& mean,
                                     const at::Tensor& rstd, const at::Tensor& x, const at::Tensor& y,
                                     const at::Tensor& gate, const at::Tensor& shift, const at::Tensor& scale,
                                     double eps) {
  ln_fwd_impl("residual_layernorm_modulate_fwd", x_new, out, mean, rstd, x, y, gate, shift, scale, eps);
}

void gated_residual_fwd(const at::Tensor& out, const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate) {
  const char* op = "gated_residual_fwd";
  check_rank(x, 3, op, "x");
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  const auto st = x.scalar_type();
  check(x, op, "x", x, {B, L, D}, std::nullopt);
  check(y, op, "y", x, {B, L, D}, st);
  check(out, op, "out", x, {B, L, D}, st);
  check(gate, op, "gate (fp32 in the launcher)", x, {B, D}, at::kFloat);
  if (out.numel() == 0) return;
  const DeviceScope scope(x);
  const cudaStream_t stream = scope.stream();
  dispatch_float(st, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool vec = use_vec(D, kVec<T>, {out.data_ptr(), x.data_ptr(), y.data_ptr(), gate.data_ptr()});
    check_launch(FASTMASK_VEC_SWITCH(vec, [&] {
                   return fm::gated_residual_fwd<T, VEC>(ptr<T>(out), ptr<T>(x), ptr<T>(y), ptr<float>(gate), B, L, D,
                                                         stream);
                 }),
                 op);
  });
}

// The three norm backwards share one kernel (NormBwdMode) and one plan.
struct NormBwdOutputs {
  OptTensor grad_x, grad_y, grad_gate, grad_shift, grad_scale;
};

void norm_bwd_impl(const char* op, fm::NormBwdMode mode, const NormBwdOutputs& o, const at::Tensor& grad_out,
                   const OptTensor& grad_res, const OptTensor& x, const OptTensor& y, const OptTensor& gate,
                   const OptTensor& scale, const OptTensor& mean, const OptTensor& rstd) {
  const bool ln = mode != fm::NormBwdMode::kGatedResidual;
  const bool gated = mode != fm::NormBwdMode::kLayerNorm;
  check_rank(grad_out, 3, op, "grad_out");
  const int64_t B = grad_out.size(0), L = grad_out.size(1), D = grad_out.size(2);
  const auto st = grad_out.scalar_type();
  check(grad_out, op, "grad_out", grad_out, {B, L, D}, std::nullopt);
  if (ln) check(*o.grad_x, op, "grad_x", grad_out, {B, L, D}, st);
  if (mode == fm::NormBwdMode::kResidualLayerNorm) check(*grad_res, op, "grad_x_new", grad_out, {B, L, D}, st);
  if (ln) {
    check(*x, op, mode == fm::NormBwdMode::kLayerNorm ? "x" : "x_new", grad_out, {B, L, D}, st);
    check(*scale, op, "scale (fp32 in the launcher)", grad_out, {B, D}, at::kFloat);
    check(*mean, op, "mean", grad_out, {B * L}, at::kFloat);
    check(*rstd, op, "rstd", grad_out, {B * L}, at::kFloat);
    check_float_param(*o.grad_shift, op, "grad_shift", grad_out, {B, D});
    check_float_param(*o.grad_scale, op, "grad_scale", grad_out, {B, D});
  }
  if (gated) {
    check(*y, op, "y", grad_out, {B, L, D}, st);
    check(*gate, op, "gate (fp32 in the launcher)", grad_out, {B, D}, at::kFloat);
    check(*o.grad_y, op, "grad_y", grad_out, {B, L, D}, st);
    check_float_param(*o.grad_gate, op, "grad_gate", grad_out, {B, D});
  }
  if (B * D == 0) return;
  if (L == 0) {  // no rows: the parameter gradients are zero sums
    for (const OptTensor* t : {&o.grad_gate, &o.grad_shift, &o.grad_scale}) {
      if (t->has_value()) (*t)->zero_();
    }
    return;
  }
  const DeviceScope scope(grad_out);
  const cudaStream_t stream = scope.stream();
  const int sms = sm_count(grad_out);
  dispatch_float(st, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    fm::NormBwdArgs a{};
    a.grad_x = ln ? o.grad_x->data_ptr() : nullptr;  // gated residual: grad_x is grad_out
    a.grad_y = gated ? o.grad_y->data_ptr() : nullptr;
    a.grad_out = grad_out.data_ptr();
    a.grad_res = grad_res.has_value() ? grad_res->data_ptr() : nullptr;
    a.x = ln ? x->data_ptr() : nullptr;
    a.y = gated ? y->data_ptr() : nullptr;
    a.gate = gated ? ptr<float>(*gate) : nullptr;
    a.scale = ln ? ptr<float>(*scale) : nullptr;
    a.mean = ln ? ptr<float>(*mean) : nullptr;
    a.rstd = ln ? ptr<float>(*rstd) : nullptr;
    const bool vec = use_vec(D, kVec<T>, {a.grad_x, a.grad_y, a.grad_out, a.grad_res, a.x, a.y, a.gate, a.scale});
    a.B = B;
    a.L = L;
    a.D = D;
    a.tpr = fm::row_threads(D / (vec ? kVec<T> : 1), fm::kNormBwdCache);
    a.rows_per_unit = fm::norm_bwd_rows_per_unit(B, L, a.tpr, sms);
    a.units = fm::ceil_div(L, a.rows_per_unit);
    const auto f32 = grad_out.options().dtype(at::kFloat);
    at::Tensor p_gate, p_shift, p_scale;
    if (gated) {
      p_gate = at::empty({B, a.units, D}, f32);
      a.part_gate = ptr<float>(p_gate);
    }
    if (ln) {
      p_shift = at::empty({B, a.units, D}, f32);
      p_scale = at::empty({B, a.units, D}, f32);
      a.part_shift = ptr<float>(p_shift);
      a.part_scale = ptr<float>(p_scale);
    }
    check_launch(FASTMASK_NORM_MODE_SWITCH(mode, MODE, [&] {
                   return FASTMASK_VEC_SWITCH(vec, [&] { return fm::norm_bwd<T, VEC, MODE>(a, stream); });
                 }),
                 op);
    if (gated) reduce_into(*o.grad_gate, p_gate, B, a.units, D, stream, op);
    if (ln) {
      reduce_into(*o.grad_shift, p_shift, B, a.units, D, stream, op);
      reduce_into(*o.grad_scale, p_scale, B, a.units, D, stream, op);
    }
  });
}

void layernorm_modulate_bwd(const at::Tensor& grad_x, const at::Tensor& grad_shift, const at::Tensor& grad_scale,
                            const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& mean, const at::Tensor& rstd) {
  NormBwdOutputs o{grad_x, std::nullopt, std::nullopt, grad_shift, grad_scale};
  norm_bwd_impl("layernorm_modulate_bwd", fm::NormBwdMode::kLayerNorm, o, grad_out, std::nullopt, x, std::nullopt,
                std::nullopt, scale, mean, rstd);
}

// grad_x of x + gate * y is grad_out itself: the caller uses grad_out, nothing is written.
void gated_residual_bwd(const at::Tensor& grad_y, const at::Tensor& grad_gate, const at::Tensor& grad_out,
                        const at::Tensor& y, const at::Tensor& gate) {
  NormBwdOutputs o{std::nullopt, grad_y, grad_gate, std::nullopt, std::nullopt};
  norm_bwd_impl("gated_residual_bwd", fm::NormBwdMode::kGatedResidual, o, grad_out, std::nullopt, std::nullopt, y,
                gate, std::nullopt, std::nullopt, std::nullopt);
}

void residual_layernorm_modulate_bwd(const at::Tensor& grad_x, const at::Tensor& grad_y, const at::Tensor& grad_gate,
                                     const at::Tensor& grad_shift, const at::Tensor& grad_scale,
                                     const at::Tensor& grad_x_new, const at::Tensor& grad_out,
                                     const at::Tensor& x_new, const at::Tensor& y, const at::Tensor& gate,
                                     const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd) {
  NormBwdOutputs o{grad_x, grad_y, grad_gate, grad_shift, grad_scale};
  norm_bwd_impl("residual_layernorm_modulate_bwd", fm::NormBwdMode::kResidualLayerNorm, o, grad_out, grad_x_new,
                x_new, y, gate, scale, mean, rstd);
}

// ----------------------------------------------------------------------------- loss
void dsm_mae_loss_fwd(const at::Tensor& loss, const at::Tensor& terms, const at::Tensor& grad_F,
                      const at::Tensor& F_out, const at::Tensor& x_noisy, const at::Tensor& y,
                      const at::Tensor& sigma, const OptTensor& mask, double mae_coef, double sigma_data, bool flow) {
  const char* op = "dsm_mae_loss_fwd";
  check_rank(F_out, 3, op, "F_out");
  const int64_t B = F_out.size(0), N = F_out.size(1), P = F_out.size(2);
  const auto st = F_out.scalar_type();
  check(F_out, op, "F_out", F_out, {B, N, P}, std::nullopt);
  // x_noisy and y: F_out's dtype, or fp32 next to a half-precision F_out.
  const auto sx = x_noisy.scalar_type();
  TORCH_CHECK(sx == st || sx == at::kFloat, "fastmask.", op, ": x_noisy must have F_out's dtype (", st,
              ") or float32, got ", sx);
  check(x_noisy, op, "x_noisy", F_out, {B, N, P}, sx);
  check(y, op, "y", F_out, {B, N, P}, sx);
  check(sigma, op, "sigma", F_out, {B}, at::kFloat);
  if (mask.has_value()) check(*mask, op, "mask", F_out, {B, N}, at::kFloat);
  check(loss, op, "loss", F_out, {B}, at::kFloat);
  check(terms, op, "terms", F_out, {B, 2}, at::kFloat);
  check(grad_F, op, "grad_F", F_out, {B, N, P}, st);
  if (B == 0) return;
  TORCH_CHECK(N > 0 && P > 0, "fastmask.", op, ": F_out must have tokens and values per token, got shape ",
              F_out.sizes());
  TORCH_CHECK(!mask.has_value() || P >= 2, "fastmask.", op,
              ": the MAE target needs at least 2 values per token (unbiased variance), got P = ", P);
  const DeviceScope scope(F_out);
  const cudaStream_t stream = scope.stream();
  dispatch_float(st, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    fm::LossArgs a{};
    a.grad_F = grad_F.data_ptr();
    a.F = F_out.data_ptr();
    a.x_noisy = x_noisy.data_ptr();
    a.y = y.data_ptr();
    a.sigma = ptr<float>(sigma);
    a.mask = ptr<float>(mask);
    a.B = B;
    a.N = N;
    a.P = P;
    a.mae_coef = static_cast<float>(mae_coef);
    a.sigma_data = static_cast<float>(sigma_data);
    a.flow = flow;
    const bool vec = use_vec(P, kVec<T>, {a.grad_F, a.F, a.x_noisy, a.y});
    const int64_t blocks = fm::loss_blocks(N, P, vec ? kVec<T> : 1);
    TORCH_CHECK(B * blocks < (int64_t(1) << 30), "fastmask.", op, ": batch too large for one launch");
    const at::Tensor partial = at::empty({B, blocks + 1, 2}, F_out.options().dtype(at::kFloat));
    a.partial = ptr<float>(partial);
    // x_noisy and y in F_out's dtype, or fp32 (only reachable when F_out is 16-bit)
    check_launch(FASTMASK_BOOL_SWITCH((sx == st || std::is_same_v<T, float>), SAME, [&] {
                   using TX = std::conditional_t<SAME, T, float>;
                   return FASTMASK_VEC_SWITCH(vec, [&] { return fm::dsm_mae_loss_fwd<T, TX, VEC>(a, stream); });
                 }),
                 op);
    check_launch(fm::dsm_mae_loss_finish(ptr<float>(loss), ptr<float>(terms), ptr<float>(partial), B, blocks,
                                         a.mae_coef, stream),
                 op);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastmask CUDA kernels (outputs first, then inputs; see fastmask/cuda_ext.py for the launchers)";
  namespace py = pybind11;
  m.def("gather_tokens_fwd", &gather_tokens_fwd, py::arg("out"), py::arg("x"), py::arg("ids_keep"), py::arg("pos"));
  m.def("gather_tokens_bwd", &gather_tokens_bwd, py::arg("grad_x"), py::arg("grad_pos"), py::arg("grad_out"),
        py::arg("ids_keep"));
  m.def("unmask_tokens_fwd", &unmask_tokens_fwd, py::arg("out"), py::arg("x_vis"), py::arg("ids_keep"),
        py::arg("mask_token"), py::arg("pos"));
  m.def("unmask_tokens_bwd", &unmask_tokens_bwd, py::arg("grad_x_vis"), py::arg("grad_mask_token"),
        py::arg("grad_pos"), py::arg("grad_out"), py::arg("ids_keep"));
  m.def("scatter_tokens_fwd", &scatter_tokens_fwd, py::arg("out"), py::arg("x_kept"), py::arg("ids_keep"),
        py::arg("fill"));
  m.def("scatter_tokens_bwd", &scatter_tokens_bwd, py::arg("grad_x_kept"), py::arg("grad_fill"), py::arg("grad_out"),
        py::arg("ids_keep"));
  m.def("layernorm_modulate_fwd", &layernorm_modulate_fwd, py::arg("out"), py::arg("mean"), py::arg("rstd"),
        py::arg("x"), py::arg("shift"), py::arg("scale"), py::arg("eps"));
  m.def("layernorm_modulate_bwd", &layernorm_modulate_bwd, py::arg("grad_x"), py::arg("grad_shift"),
        py::arg("grad_scale"), py::arg("grad_out"), py::arg("x"), py::arg("scale"), py::arg("mean"), py::arg("rstd"));
  m.def("gated_residual_fwd", &gated_residual_fwd, py::arg("out"), py::arg("x"), py::arg("y"), py::arg("gate"));
  m.def("gated_residual_bwd", &gated_residual_bwd, py::arg("grad_y"), py::arg("grad_gate"), py::arg("grad_out"),
        py::arg("y"), py::arg("gate"));
  m.def("residual_layernorm_modulate_fwd", &residual_layernorm_modulate_fwd, py::arg("x_new"), py::arg("out"),
        py::arg("mean"), py::arg("rstd"), py::arg("x"), py::arg("y"), py::arg("gate"), py::arg("shift"),
        py::arg("scale"), py::arg("eps"));
  m.def("residual_layernorm_modulate_bwd", &residual_layernorm_modulate_bwd, py::arg("grad_x"), py::arg("grad_y"),
        py::arg("grad_gate"), py::arg("grad_shift"), py::arg("grad_scale"), py::arg("grad_x_new"),
        py::arg("grad_out"), py::arg("x_new"), py::arg("y"), py::arg("gate"), py::arg("scale"), py::arg("mean"),
        py::arg("rstd"));
  m.def("dsm_mae_loss_fwd", &dsm_mae_loss_fwd, py::arg("loss"), py::arg("terms"), py::arg("grad_F"),
        py::arg("F_out"), py::arg("x_noisy"), py::arg("y"), py::arg("sigma"), py::arg("mask"), py::arg("mae_coef"),
        py::arg("sigma_data"), py::arg("flow") = false);
}
