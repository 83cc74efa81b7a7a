// torch operator `edgellm::qmatmul` over csrc/qmatmul.c, so the compiled decode step calls the kernel from
// C++ (~1 us) instead of through Python (~10 us, x 121 calls a token for the default model). Built by
// kernels/native.py against torch's stable C ABI (header-only C++ wrappers: seconds to compile, no libtorch
// C++ ABI coupling). Callers (kernels/blockq.py) check shapes and dtypes; this only forwards.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <vector>

extern "C" int edgellm_qmatmul(int bits, const void *x, int x_bf16, int64_t M, int64_t K, const void *qs,
                               const uint16_t *dm, int64_t N, void *y, int y_bf16, int isa, int threads);

using torch::stable::Tensor;

// x (..., K) fp32 or bf16 contiguous; qs/dm the packed weight; -> (..., n) in x's dtype.
static Tensor qmatmul(Tensor x, Tensor qs, Tensor dm, int64_t bits, int64_t n, int64_t isa) {
  const int64_t k = x.size(x.dim() - 1);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  Tensor y = torch::stable::new_empty(x, shape);
  const int bf16 = x.scalar_type() == torch::headeronly::ScalarType::BFloat16;
  const int rc = edgellm_qmatmul((int)bits, x.data_ptr(), bf16, x.numel() / k, k, qs.data_ptr(),
                                 (const uint16_t *)dm.data_ptr(), n, y.data_ptr(), bf16, (int)isa, 0);
  STD_TORCH_CHECK(rc == 0, "edgellm::qmatmul: out of memory");
  return y;
}

STABLE_TORCH_LIBRARY(edgellm, m) {
  m.def("qmatmul(Tensor x, Tensor qs, Tensor dm, int bits, int n, int isa) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(edgellm, CPU, m) { m.impl("qmatmul", TORCH_BOX(&qmatmul)); }
