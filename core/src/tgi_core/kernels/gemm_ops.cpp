// tgi::amx_linear and tgi::amx_linear_int8 as C++ CPU kernels of the dispatcher, so that a
// step's GEMM calls (~120 a step on the SmolLM shape; from a compiled graph's wrapper, or
// from the eager linear layers) go straight to the packed-weight kernel: no Python
// implementation, argument conversion or ctypes call in between (~7 us a call).
//
// The one C++ file here that includes torch's headers: built against the installed torch by
// tgi_core/kernels (load_torch_library), registered when loaded. The GEMM itself stays in
// amx_gemm.cpp / vec_gemm.cpp, whichever this CPU runs (tgi_core.model.layers.amx_gemm);
// tgi_gemm_ops_bind hands this library its two entry points. The ops' schemas, fake
// kernels and Python fallbacks are in tgi_core/model/layers/opaque.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace {

using Bf16Linear = void (*)(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t N,
                            const uint16_t* bias, uint16_t* y);
using Int8Linear = void (*)(const uint16_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N,
                            const uint16_t* scales, const uint16_t* bias, uint16_t* y);

Bf16Linear g_bf16 = nullptr;
Int8Linear g_int8 = nullptr;

constexpr int64_t kStep = 32;  // input features per packed step (amx_gemm.K_STEP)

const uint16_t* bits(const at::Tensor& tensor) {
  return reinterpret_cast<const uint16_t*>(tensor.const_data_ptr());
}

// A per-output vector (scales, bias) of at least out_features values as contiguous bf16,
// converted only when it is not
std::optional<at::Tensor> as_bf16(const std::optional<at::Tensor>& vector, int64_t out_features) {
  if (!vector.has_value()) return vector;
  TORCH_CHECK(vector->numel() >= out_features, "amx_gemm: a bias or scales vector of ",
              vector->numel(), " values for ", out_features, " outputs");
  if (vector->scalar_type() == at::kBFloat16 && vector->is_contiguous()) return vector;
  return vector->to(at::kBFloat16).contiguous();
}

// x [..., K] bf16 times a packed weight of out_features rows: [..., out_features] bf16
template <typename Call>
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                  Call call) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "amx_gemm: x is ", x.scalar_type(),
              ", not bfloat16");
  TORCH_CHECK(packed.dim() == 5 && packed.is_contiguous() && packed.size(2) == 16 &&
                  packed.size(3) == 16 && packed.size(4) == 2,
              "amx_gemm: the weight is not packed");
  const int64_t K = packed.size(1) * kStep;
  TORCH_CHECK(x.size(-1) == K, "amx_gemm: x has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(out_features > 0 && out_features <= packed.size(0) * 16,
              "amx_gemm: out_features beyond the packed weight");
  const bool flat = x.dim() == 2 && x.is_contiguous();
  const at::Tensor rows = flat ? x : x.reshape({-1, K}).contiguous();
  at::Tensor out = at::empty({rows.size(0), out_features}, rows.options());
  if (rows.size(0) > 0)
    call(bits(rows), rows.size(0), K, reinterpret_cast<uint16_t*>(out.mutable_data_ptr()));
  if (flat) return out;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return out.view(shape);
}

at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& packed,
                      const std::optional<at::Tensor>& bias, int64_t out_features) {
  TORCH_CHECK(g_bf16 != nullptr, "amx_gemm: no kernel bound (tgi_gemm_ops_bind)");
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16, "amx_gemm.linear: the weight is ",
              packed.scalar_type(), ", not bfloat16");
  const std::optional<at::Tensor> b = as_bf16(bias, out_features);
  return linear(x, packed, out_features, [&](const uint16_t* rows, int64_t M, int64_t K, uint16_t* y) {
    g_bf16(rows, M, K, bits(packed), out_features, b ? bits(*b) : nullptr, y);
  });
}

at::Tensor amx_linear_int8(const at::Tensor& x, const at::Tensor& packed,
                           const at::Tensor& scales, const std::optional<at::Tensor>& bias,
                           int64_t out_features) {
  TORCH_CHECK(g_int8 != nullptr, "amx_gemm: no kernel bound (tgi_gemm_ops_bind)");
  TORCH_CHECK(packed.scalar_type() == at::kChar, "amx_gemm.linear_int8: the weight is ",
              packed.scalar_type(), ", not int8");
  const std::optional<at::Tensor> s = as_bf16(scales, out_features);
  const std::optional<at::Tensor> b = as_bf16(bias, out_features);
  return linear(x, packed, out_features, [&](const uint16_t* rows, int64_t M, int64_t K, uint16_t* y) {
    g_int8(rows, M, K, packed.const_data_ptr<int8_t>(), out_features, bits(*s),
           b ? bits(*b) : nullptr, y);
  });
}

}  // namespace

// The packed-weight kernel's two entry points (tgi_*_linear_bf16 / _int8); until they are
// bound, the ops refuse to run.
extern "C" void tgi_gemm_ops_bind(void* bf16, void* int8) {
  g_bf16 = reinterpret_cast<Bf16Linear>(bf16);
  g_int8 = reinterpret_cast<Int8Linear>(int8);
}

TORCH_LIBRARY_IMPL(tgi, CPU, m) {
  m.impl("amx_linear", &amx_linear);
  m.impl("amx_linear_int8", &amx_linear_int8);
}
