// torch operator `edgellm_attention::cache_attention` over csrc/decode_attention.c, so the compiled decode and
// verify steps call the kernel from C++ (one call per layer). Built by kernels/native.py against torch's stable
// C ABI, like qmatmul_op.cpp (its own namespace: a library namespace is defined once per process). The caller
// (kernels/cache_attention.py) checks shapes, dtypes and contiguity; this only forwards.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <vector>

extern "C" int edgellm_cache_attention(int bf16, const void *q, const void *k, const void *v, void *out,
                                       const int64_t *slot_pos, const int64_t *qpos, int64_t window, int64_t B,
                                       int64_t T, int64_t H, int64_t Hkv, int64_t S, int64_t D, float scale,
                                       int threads);

using torch::stable::Tensor;

// q (B, T, H, D); k, v (>= B, Hkv, S, D); slot_pos (S,) and pos (T,) int64 -> (B, T, H, D) in q's dtype.
static Tensor cache_attention(Tensor q, Tensor k, Tensor v, Tensor slot_pos, Tensor pos, int64_t window,
                              double scale) {
  std::vector<int64_t> shape(q.sizes().begin(), q.sizes().end());
  Tensor out = torch::stable::new_empty(q, shape);
  const int bf16 = q.scalar_type() == torch::headeronly::ScalarType::BFloat16;
  const int rc = edgellm_cache_attention(bf16, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                         (const int64_t *)slot_pos.data_ptr(), (const int64_t *)pos.data_ptr(),
                                         window, q.size(0), q.size(1), q.size(2), k.size(1), k.size(2), q.size(3),
                                         (float)scale, 0);
  STD_TORCH_CHECK(rc == 0, "edgellm_attention::cache_attention: bad shapes or out of memory");
  return out;
}

STABLE_TORCH_LIBRARY(edgellm_attention, m) {
  m.def("cache_attention(Tensor q, Tensor k, Tensor v, Tensor slot_pos, Tensor pos, int window, float scale) "
        "-> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(edgellm_attention, CPU, m) { m.impl("cache_attention", TORCH_BOX(&cache_attention)); }
