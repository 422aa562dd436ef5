// exp(x) for x <= 0 (scores or logits minus their max), shared by the kernels here.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// Vectorizable: 2^n * e^r with |r| <= ln2/2 and Cephes' polynomial for e^r (about
// 1 ulp); under -87 (and for -inf) it returns ~1e-38 where expf returns 0, which a sum
// holding the maximum's own term (1) cannot see.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}
