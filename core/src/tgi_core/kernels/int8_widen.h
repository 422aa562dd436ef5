// int8 weights widened to bf16 (exact) for the packed-weight GEMM kernels (amx_gemm.cpp,
// vec_gemm.cpp), which share amx_gemm.pack's layout. Needs AVX512-VBMI.
//
// An int8 q (|q| <= 127) is bf16(|q|) with q's sign bit on top. The low and high bytes
// of bf16(m), m = 0..127, are two 128-byte tables that one VPERMI2B each reads; an
// unpack then interleaves them into bf16 words, pairing byte j of each 128-bit lane with
// byte j + 8. amx_gemm.pack stores int8 weights in that order, 64 values at a time, so
// the words come out in tile order: about half the instructions of widening through
// float32 (the SmolLM layers at one row on AMX: 3.15 -> 3.01 ms).
#pragma once

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

struct Bf16Bytes {
  alignas(64) uint8_t lo[128];
  alignas(64) uint8_t hi[128];
  Bf16Bytes() {
    for (int m = 0; m < 128; ++m) {
      const float value = static_cast<float>(m);
      uint32_t bits;
      memcpy(&bits, &value, sizeof bits);
      lo[m] = static_cast<uint8_t>(bits >> 16);
      hi[m] = static_cast<uint8_t>(bits >> 24);
    }
  }
};
inline const Bf16Bytes kBf16Bytes;

// One tile-step of int8 weights (512 values, in amx_gemm.pack's int8 order) as bf16
// (exact) in tile order, [16 k-pairs][16 columns][2], into ``out`` (64-byte aligned)
inline void widen_tile(const int8_t* tile, uint16_t* out) {
  const __m512i lo0 = _mm512_load_si512(kBf16Bytes.lo), lo1 = _mm512_load_si512(kBf16Bytes.lo + 64);
  const __m512i hi0 = _mm512_load_si512(kBf16Bytes.hi), hi1 = _mm512_load_si512(kBf16Bytes.hi + 64);
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int i = 0; i < 512; i += 64) {
    const __m512i q = _mm512_loadu_si512(tile + i);
    const __m512i magnitude = _mm512_abs_epi8(q);
    const __m512i lo = _mm512_permutex2var_epi8(lo0, magnitude, lo1);
    // hi | (q & 0x80): the high byte with q's sign
    const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(hi0, magnitude, hi1), q, sign, 0xF8);
    _mm512_store_si512(out + i, _mm512_unpacklo_epi8(lo, hi));
    _mm512_store_si512(out + i + 32, _mm512_unpackhi_epi8(lo, hi));
  }
}

// bf16 values (masked to ``mask``) as float32 lanes
inline __m512 load_bf16_lanes(const uint16_t* values, __mmask16 mask) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, values)), 16));
}

// rows x 16 float accumulators (acc + 16 * r; * scales, + bias: bf16 vectors or null) ->
// bf16 columns [col0, col0 + 16) of y, rounded to nearest even, clipped to N
inline void store_columns(const float* acc, int rows, int64_t col0, int64_t N,
                          const uint16_t* scales, const uint16_t* bias, uint16_t* y,
                          int64_t y_stride) {
  if (col0 >= N) return;
  const int cols = N - col0 < 16 ? static_cast<int>(N - col0) : 16;
  const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
  const __m512 scale = scales ? load_bf16_lanes(scales + col0, mask) : _mm512_set1_ps(1.f);
  const __m512 offset = bias ? load_bf16_lanes(bias + col0, mask) : _mm512_setzero_ps();
  for (int r = 0; r < rows; ++r) {
    __m512 value = _mm512_loadu_ps(acc + 16 * r);
    if (scales) value = _mm512_mul_ps(value, scale);
    value = _mm512_add_ps(value, offset);
    _mm256_mask_storeu_epi16(y + r * y_stride + col0, mask,
                             reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(value)));
  }
}
