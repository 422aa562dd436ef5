// A decoder layer's small ops, fused, for eager steps: tgi::rms_norm, tgi::add_rms_norm and
// tgi::rotary as C++ CPU kernels of the dispatcher. In eager PyTorch each is 5-12 ATen ops
// (a float32 copy, the square, the mean, rsqrt, the products and casts; the rotation's
// halves, products and concatenation), ~25-40 us a call on the SmolLM shape at one token,
// nearly all of it dispatch; here each is one call of a few microseconds. A compiled model
// keeps the PyTorch ops, which inductor fuses itself (tgi_core/model/layers/fused.py).
//
// Each computes what the PyTorch path computes, rounding where it rounds: the norm in float32
// (x * 1/sqrt(mean(x^2) + eps), rounded to x's dtype, times the weight, rounded again); the
// rotation's two products each rounded to x's dtype before their sum. The one difference is
// the order of the sum of squares (16 interleaved float32 partial sums, added in a fixed
// order): a few float32 ulps, sometimes one bf16 ulp after rounding, and a row's result never
// depends on the other rows. Tensors: float32 or bfloat16, the weight (cos, sin) in x's dtype,
// the last dimension contiguous; anything else is refused (the Python side checks first).
//
// Built against the installed torch (kernels.load_torch_library) with -O3 -march=native and
// no floating-point contraction, so the loops vectorize and every product rounds as in
// PyTorch.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

namespace {

// bf16 values are handled as their bits (uint16_t) so that the loops vectorize
inline float widen(float value) { return value; }
inline float widen(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof out);
  return out;
}

// float -> T, rounded to nearest even (NaN stays NaN), as PyTorch's casts do; branch-free
template <typename T>
inline T narrow(float value);
template <>
inline float narrow<float>(float value) {
  return value;
}
template <>
inline uint16_t narrow<uint16_t>(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(nan ? 0x7FC0u : rounded);
}

// x's row rounded to T after the norm, times the weight: out[i] = w[i] * T(x[i] * inv)
template <typename T>
inline void scale_row(const float* x, const T* weight, int64_t n, float inv, T* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float normed = widen(narrow<T>(x[i] * inv));
    out[i] = narrow<T>(widen(weight[i]) * normed);
  }
}

// a bf16 tensor's values as their bits
const uint16_t* bits(const at::Tensor& tensor) {
  return reinterpret_cast<const uint16_t*>(tensor.const_data_ptr<c10::BFloat16>());
}
uint16_t* mutable_bits(at::Tensor& tensor) {
  return reinterpret_cast<uint16_t*>(tensor.mutable_data_ptr<c10::BFloat16>());
}

constexpr int kLanes = 16;

// 1 / sqrt(mean(x^2) + eps) of a float32 row
inline float inverse_rms(const float* x, int64_t n, float eps) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += x[i + j] * x[i + j];
  for (int j = 0; i < n; ++i, ++j) lanes[j] += x[i] * x[i];
  float sum = 0.f;
  for (int j = 0; j < kLanes; ++j) sum += lanes[j];
  return 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
}

void check_dtypes(const at::Tensor& x, const at::Tensor& other, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "tgi fused ops: x is ", x.scalar_type(), ", not float32 or bfloat16");
  TORCH_CHECK(other.scalar_type() == x.scalar_type(), "tgi fused ops: ", name, " is ",
              other.scalar_type(), ", x ", x.scalar_type());
}

// rows of x (+ residual, rounded to T: the sum is also returned) normalized
template <typename T>
void norm_rows(const T* x, const T* residual, const T* weight, int64_t rows, int64_t n,
               int64_t x_stride, int64_t residual_stride, float eps, T* out, T* summed) {
  at::parallel_for(0, rows, 16, [&](int64_t first, int64_t last) {
    std::vector<float> row(n);
    for (int64_t r = first; r < last; ++r) {
      const T* xr = x + r * x_stride;
      if (residual != nullptr) {
        const T* rr = residual + r * residual_stride;
        T* sr = summed + r * n;
        for (int64_t i = 0; i < n; ++i) {
          sr[i] = narrow<T>(widen(xr[i]) + widen(rr[i]));
          row[i] = widen(sr[i]);
        }
      } else {
        for (int64_t i = 0; i < n; ++i) row[i] = widen(xr[i]);
      }
      scale_row(row.data(), weight, n, inverse_rms(row.data(), n, eps), out + r * n);
    }
  });
}

// x, or a copy, whose rows (of its last dimension) are evenly spaced and contiguous
at::Tensor with_rows(const at::Tensor& x) {
  const bool rows = x.dim() >= 1 && x.stride(-1) == 1 && (x.dim() <= 2 || x.is_contiguous());
  return rows ? x : x.contiguous();
}

// (rows, row stride) of a tensor with_rows gave
std::pair<int64_t, int64_t> rows_of(const at::Tensor& x) {
  const int64_t n = x.size(-1);
  if (x.dim() == 1) return {1, n};
  if (x.dim() == 2) return {x.size(0), x.stride(0)};
  return {x.numel() / n, n};
}

std::tuple<at::Tensor, at::Tensor> norm(const at::Tensor& input,
                                        const std::optional<at::Tensor>& residual_input,
                                        const at::Tensor& weight_input, double eps) {
  check_dtypes(input, weight_input, "the weight");
  TORCH_CHECK(input.dim() >= 1, "tgi::rms_norm: x is a scalar");
  const at::Tensor x = with_rows(input), weight = weight_input.contiguous();
  const int64_t n = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n, "tgi::rms_norm: a weight of ",
              weight.sizes(), " for rows of ", n);
  const auto [rows, x_stride] = rows_of(x);
  at::Tensor residual;
  int64_t residual_stride = 0;
  if (residual_input) {
    check_dtypes(input, *residual_input, "the residual");
    TORCH_CHECK(residual_input->sizes() == x.sizes(), "tgi::add_rms_norm: x is ", x.sizes(),
                ", the residual ", residual_input->sizes());
    residual = with_rows(*residual_input);
    residual_stride = rows_of(residual).second;
  }
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor summed = residual.defined() ? at::empty_like(out) : at::Tensor();
  const bool add = residual.defined();
  if (x.scalar_type() == at::kFloat) {
    norm_rows<float>(x.const_data_ptr<float>(), add ? residual.const_data_ptr<float>() : nullptr,
                     weight.const_data_ptr<float>(), rows, n, x_stride, residual_stride,
                     static_cast<float>(eps), out.mutable_data_ptr<float>(),
                     add ? summed.mutable_data_ptr<float>() : nullptr);
  } else {
    norm_rows<uint16_t>(bits(x), add ? bits(residual) : nullptr, bits(weight), rows, n, x_stride,
                        residual_stride, static_cast<float>(eps), mutable_bits(out),
                        add ? mutable_bits(summed) : nullptr);
  }
  return {out, summed};
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return std::get<0>(norm(x, std::nullopt, weight, eps));
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  return norm(x, residual, weight, eps);
}

// One head's rotation: first * cos - second * sin, second * cos + first * sin over
// 2 * half dimensions, each product rounded to T
template <typename T>
inline void rotate_head(const T* __restrict__ in, const T* __restrict__ cos,
                        const T* __restrict__ sin, int64_t half, T* __restrict__ out) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = widen(in[i]), b = widen(in[half + i]);
    const float a_cos = widen(narrow<T>(a * widen(cos[i])));
    const float b_sin = widen(narrow<T>(b * widen(sin[i])));
    const float b_cos = widen(narrow<T>(b * widen(cos[half + i])));
    const float a_sin = widen(narrow<T>(a * widen(sin[half + i])));
    out[i] = narrow<T>(a_cos - b_sin);
    out[half + i] = narrow<T>(b_cos + a_sin);
  }
}

// out[t, h] = x[t, h] rotated over the rotary dimensions (cos/sin's width); the rest copied
template <typename T>
void rotate(const T* x, const T* cos, const T* sin, int64_t tokens, int64_t heads, int64_t dim,
            int64_t rotary, int64_t token_stride, int64_t head_stride, T* out) {
  at::parallel_for(0, tokens, 16, [=](int64_t first_token, int64_t last_token) {
    for (int64_t t = first_token; t < last_token; ++t) {
      for (int64_t h = 0; h < heads; ++h) {
        const T* in = x + t * token_stride + h * head_stride;
        T* o = out + (t * heads + h) * dim;
        rotate_head(in, cos + t * rotary, sin + t * rotary, rotary / 2, o);
        for (int64_t i = rotary; i < dim; ++i) o[i] = in[i];
      }
    }
  });
}

at::Tensor rotary(const at::Tensor& input, const at::Tensor& cos_input,
                  const at::Tensor& sin_input) {
  check_dtypes(input, cos_input, "cos");
  check_dtypes(input, sin_input, "sin");
  TORCH_CHECK(input.dim() == 3, "tgi::rotary: x is ", input.sizes(),
              ", not [tokens, heads, head_dim]");
  const at::Tensor x = input.stride(-1) == 1 ? input : input.contiguous();
  const at::Tensor cos = cos_input.contiguous(), sin = sin_input.contiguous();
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2);
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == tokens && cos.sizes() == sin.sizes(),
              "tgi::rotary: cos is ", cos.sizes(), ", sin ", sin.sizes(), " for ", tokens,
              " tokens");
  const int64_t rotary = cos.size(1);
  TORCH_CHECK(rotary % 2 == 0 && rotary <= dim, "tgi::rotary: rotary_dim ", rotary,
              " for head_dim ", dim);
  at::Tensor out = at::empty({tokens, heads, dim}, x.options());
  if (x.scalar_type() == at::kFloat) {
    rotate<float>(x.const_data_ptr<float>(), cos.const_data_ptr<float>(),
                  sin.const_data_ptr<float>(), tokens, heads, dim, rotary, x.stride(0),
                  x.stride(1), out.mutable_data_ptr<float>());
  } else {
    rotate<uint16_t>(bits(x), bits(cos), bits(sin), tokens, heads, dim, rotary, x.stride(0),
                     x.stride(1), mutable_bits(out));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tgi, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(tgi, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary", &rotary);
}
