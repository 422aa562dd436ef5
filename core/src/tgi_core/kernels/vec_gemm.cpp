// bf16 linear layers on AVX-512 BF16 without AMX (AMD Zen 4, Intel Cooper Lake): y[M, N] =
// x[M, K] @ W[N, K]^T (+ bias), float32 accumulation, bf16 output rounded to nearest
// even; W in bf16, or in int8 with one scale per output feature (widened to bf16 here,
// exact, scaled at the store). The same weight layout as amx_gemm.cpp
// (tgi_core.model.layers.amx_gemm.pack): for one tile of 16 output features, its K / 2
// pairs of input features follow one another, 64 bytes each ([16 columns][2]), which is
// the weight operand of one VDPBF16PS; a row's pair of inputs is the broadcast operand.
//
// Why not oneDNN: on a 2-core Zen 4 its bf16 matmul on a prepacked weight streams the
// weights of a model step at ~19 GB/s at one row, and at 64 rows (compute-bound) loses
// ~25% when the weights come from memory instead of cache: it does not fetch the next
// weights while it computes. This kernel reads the weight once per block of rows, in the
// stored order, prefetching ahead of the first rows.
//
// Each output is one float32 lane that sums its K / 2 pair products in order, whatever
// M is: a row's result does not depend on the other rows of the call.
//
// Parallelism: OpenMP threads split the output tiles (pairs of them: N is padded to a
// multiple of 32); each thread takes its tiles four at a time (64 columns) over row
// groups of up to kRows, in super-blocks of kSuperRows rows so that a long prefill's
// rows stay in cache while a block of weights is reused across them.

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#include <immintrin.h>
#include <omp.h>

#include "int8_widen.h"

namespace {

typedef uint16_t bf16;

constexpr int64_t kTileElems = 512;  // one tile-step: 32 inputs x 16 outputs
constexpr int kRows = 6;             // rows per register block: 6 x 4 accumulators
constexpr int kCols = 4;             // tiles per column block
constexpr int64_t kSuperRows = 512;
// int8 weights for at most kFusedRows rows are widened in registers, kFusedGroup rows
// at a time; more rows share one widening of each block, in memory
constexpr int64_t kFusedRows = 8;
constexpr int kFusedGroup = 4;
// bytes ahead in each tile's stream, into L2: on a Zen 4 the SmolLM layers at one row read
// 24-27 GB/s prefetching 1 KB ahead into L1, 29-32 GB/s 512 bytes ahead into L2
constexpr int64_t kPrefetchAhead = 512;
// int8 weights widened in registers (a few rows): 2 KB ahead. The SmolLM layers' int8
// weights at one row: 24-26 GB/s at 512 bytes, 27-30 at 2 KB, less again at 4 and 8 KB
constexpr int64_t kPrefetchAheadInt8 = 2048;
// At one or two rows, int8 weights are read kWideCols tiles (weight streams) at a time,
// 1 KB ahead in each: the SmolLM layers' int8 chain at one row 3.70-4.43 -> 3.57-3.67 ms
// (medians of 40 runs, 4 tiles 2 KB ahead against 8 tiles 1 KB ahead)
constexpr int kWideCols = 8;
constexpr int64_t kWideRows = 2;
constexpr int64_t kPrefetchAheadInt8Wide = 1024;

// Lines of the next block of weights that a row group fetches into L2 while it computes
// (the later row groups of a block, whose own weights are in cache by then): the first
// row group streams its block from memory, the others would leave the memory idle.
struct Ahead {
  const char* lines = nullptr;
  int64_t count = 0;
};

// acc[r][c] (16 floats each, into ``out`` [R][C][16]) = rows r of x times tiles c of w
// (tile c at w + c * tile_stride; K / 2 pairs), over all of K. kPrefetch: fetch each
// tile's stream ahead (the first rows of a block, when the weight comes from memory);
// ahead: lines to fetch meanwhile, spread over the pairs.
template <int R, int C, bool kPrefetch>
inline void multiply(const bf16* x, int64_t K, const bf16* w, int64_t tile_stride, float* out,
                     Ahead ahead) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  const int64_t pairs = K / 2, per_pair = pairs ? (ahead.count + pairs - 1) / pairs : 0;
  for (int64_t p = 0; p < pairs; ++p) {
    for (int64_t i = p * per_pair; i < (p + 1) * per_pair && i < ahead.count; ++i)
      _mm_prefetch(ahead.lines + 64 * i, _MM_HINT_T1);
    __m512bh weights[C];
    for (int c = 0; c < C; ++c) {
      const bf16* tile = w + c * tile_stride + 32 * p;
      if constexpr (kPrefetch) _mm_prefetch(reinterpret_cast<const char*>(tile) + kPrefetchAhead, _MM_HINT_T1);
      weights[c] = (__m512bh)_mm512_loadu_si512(tile);
    }
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      memcpy(&pair, x + r * K + 2 * p, sizeof pair);
      const __m512bh inputs = (__m512bh)_mm512_set1_epi32(pair);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], weights[c], inputs);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + (r * C + c) * 16, acc[r][c]);
}

// multiply for int8 weights (tile c at w + c * tile_stride, in amx_gemm.pack's int8
// order), widened in registers 64 values (two pairs) at a time: for a few rows, where
// widening a block to memory first costs more than widening it once per row group
template <int R, int C>
inline void multiply_int8(const bf16* x, int64_t K, const int8_t* w, int64_t tile_stride,
                          float* out) {
  constexpr int64_t kAhead = C >= kWideCols ? kPrefetchAheadInt8Wide : kPrefetchAheadInt8;
  const __m512i lo0 = _mm512_load_si512(kBf16Bytes.lo), lo1 = _mm512_load_si512(kBf16Bytes.lo + 64);
  const __m512i hi0 = _mm512_load_si512(kBf16Bytes.hi), hi1 = _mm512_load_si512(kBf16Bytes.hi + 64);
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < K / 2; p += 2) {
    __m512bh first[C], second[C];
    for (int c = 0; c < C; ++c) {
      const int8_t* chunk = w + c * tile_stride + 32 * p;
      _mm_prefetch(reinterpret_cast<const char*>(chunk) + kAhead, _MM_HINT_T1);
      const __m512i q = _mm512_loadu_si512(chunk);
      const __m512i magnitude = _mm512_abs_epi8(q);
      const __m512i lo = _mm512_permutex2var_epi8(lo0, magnitude, lo1);
      const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(hi0, magnitude, hi1), q, sign, 0xF8);
      first[c] = (__m512bh)_mm512_unpacklo_epi8(lo, hi);
      second[c] = (__m512bh)_mm512_unpackhi_epi8(lo, hi);
    }
    for (int r = 0; r < R; ++r) {
      int32_t pairs[2];
      memcpy(pairs, x + r * K + 2 * p, sizeof pairs);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pairs[0]), b = (__m512bh)_mm512_set1_epi32(pairs[1]);
      for (int c = 0; c < C; ++c)
        acc[r][c] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[r][c], first[c], a), second[c], b);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + (r * C + c) * 16, acc[r][c]);
}

// acc [rows][C][16] (a row group times C tiles) to y's columns col0 .. col0 + 16 * C
template <int C>
inline void store_group(const float* acc, int rows, int64_t col0, int64_t N, const bf16* scales,
                        const bf16* bias, bf16* y) {
  alignas(64) float tile[kRows * 16];
  static_assert(kWideRows <= kRows, "store_group's tile holds kRows rows");
  for (int c = 0; c < C; ++c) {
    for (int r = 0; r < rows; ++r) memcpy(tile + 16 * r, acc + (r * C + c) * 16, 64);
    store_columns(tile, rows, col0 + 16 * c, N, scales, bias, y, N);
  }
}

// ``rows`` rows (at most kRows; at most kFusedRows for int8 weights) of x times C tiles
// of w (bf16, or int8 widened in registers) into acc [rows][C][16]
template <int C, typename W>
inline void row_group(const bf16* x, int64_t K, const W* w, int64_t tile_stride, int rows,
                      bool prefetch, float* acc, Ahead ahead = {}) {
  if constexpr (sizeof(W) == 1) {
    switch (rows) {
      case 1: multiply_int8<1, C>(x, K, w, tile_stride, acc); break;
      case 2: multiply_int8<2, C>(x, K, w, tile_stride, acc); break;
      case 3: multiply_int8<3, C>(x, K, w, tile_stride, acc); break;
      default: multiply_int8<4, C>(x, K, w, tile_stride, acc);
    }
    return;
  } else {
#define TGI_CASE(R)                                                                  \
  case R:                                                                            \
    if (prefetch) multiply<R, C, true>(x, K, w, tile_stride, acc, ahead);            \
    else multiply<R, C, false>(x, K, w, tile_stride, acc, ahead);                    \
    break;
    switch (rows) {
      TGI_CASE(1) TGI_CASE(2) TGI_CASE(3) TGI_CASE(4) TGI_CASE(5) TGI_CASE(6)
    }
#undef TGI_CASE
  }
}

// This thread's buffer of at least ``elements`` bf16 values, 64-byte aligned (kept)
inline bf16* widen_buffer(int64_t elements) {
  thread_local bf16* buffer = nullptr;
  thread_local int64_t capacity = 0;
  if (capacity < elements) {
    free(buffer);
    capacity = (elements + 31) / 32 * 32;
    buffer = static_cast<bf16*>(aligned_alloc(64, capacity * sizeof(bf16)));
  }
  return buffer;
}

// One or two rows of x times int8 tiles [first, last) of w (an even count), widened in
// registers kWideCols tiles at a time, into y
template <int R>
void few_rows_int8(const bf16* x, int64_t K, const int8_t* w, int64_t tile_elems, int64_t first,
                   int64_t last, int64_t N, const bf16* scales, const bf16* bias, bf16* y) {
  alignas(64) float acc[R * kWideCols * 16];
  int64_t t = first;
  for (; t + kWideCols <= last; t += kWideCols) {
    multiply_int8<R, kWideCols>(x, K, w + t * tile_elems, tile_elems, acc);
    store_group<kWideCols>(acc, R, 16 * t, N, scales, bias, y);
  }
  for (; t < last; t += 2) {
    multiply_int8<R, 2>(x, K, w + t * tile_elems, tile_elems, acc);
    store_group<2>(acc, R, 16 * t, N, scales, bias, y);
  }
}

template <typename W>
void linear(const bf16* x, int64_t M, int64_t K, const W* w, int64_t N, const bf16* scales,
            const bf16* bias, bf16* y) {
  const int64_t k_steps = K / 32, tile_elems = k_steps * kTileElems;
  const int64_t tile_pairs = (N + 31) / 32;  // pairs of tiles: the packing's unit
#pragma omp parallel
  {
    const int thread = omp_get_thread_num(), threads = omp_get_num_threads();
    const int64_t first = 2 * (tile_pairs * thread / threads);
    const int64_t last = 2 * (tile_pairs * (thread + 1) / threads);
    bool few_rows = false;
    if constexpr (sizeof(W) == 1) {
      few_rows = M <= kWideRows;
      if (few_rows && M == 1) few_rows_int8<1>(x, K, w, tile_elems, first, last, N, scales, bias, y);
      else if (few_rows) few_rows_int8<2>(x, K, w, tile_elems, first, last, N, scales, bias, y);
    }
    if (first < last && !few_rows) {
      alignas(64) float acc[kRows * kCols * 16];
      // int8: a block's tiles widened to bf16 once for all its rows, into a buffer each
      // thread keeps (a fresh allocation above 128 KB would be mapped, and faulted in,
      // on every call)
      bf16* wide = nullptr;
      if constexpr (sizeof(W) == 1) wide = widen_buffer(kCols * tile_elems);
      for (int64_t row0 = 0; row0 < M; row0 += kSuperRows) {
        const int64_t row_end = row0 + kSuperRows < M ? row0 + kSuperRows : M;
        for (int64_t t = first; t < last; t += kCols) {
          const int tiles = last - t >= kCols ? kCols : static_cast<int>(last - t);
          const W* raw = w + t * tile_elems;
          if (sizeof(W) == 1 && M <= kFusedRows) {  // few rows: widen in registers
            for (int64_t r = row0; r < row_end; r += kFusedGroup) {
              const int rows = row_end - r >= kFusedGroup ? kFusedGroup : static_cast<int>(row_end - r);
              if (tiles == kCols) row_group<kCols>(x + r * K, K, raw, tile_elems, rows, true, acc);
              else row_group<2>(x + r * K, K, raw, tile_elems, rows, true, acc);
              if (tiles == kCols) store_group<kCols>(acc, rows, 16 * t, N, scales, bias, y + r * N);
              else store_group<2>(acc, rows, 16 * t, N, scales, bias, y + r * N);
            }
            continue;
          }
          const bf16* block = reinterpret_cast<const bf16*>(raw);
          if constexpr (sizeof(W) == 1) {  // widened once for every row group
            for (int64_t step = 0; step < tiles * k_steps; ++step)
              widen_tile(raw + step * kTileElems, wide + step * kTileElems);
            block = wide;
          }
          // the next block's weights, in equal slices over this block's later row groups
          // when they hold a full group's rows or more (8 rows, 6 + 2: the short group
          // fetched faster than it computed, and 8 rows lost 20%)
          const int64_t later = row_end - row0 >= 2 * kRows ? (row_end - row0 - 1) / kRows : 0;
          const int64_t next_tiles = t + kCols < last ? (last - t - kCols < kCols ? last - t - kCols : kCols) : 0;
          const int64_t next_lines = later ? next_tiles * tile_elems * int64_t(sizeof(W)) / 64 : 0;
          const char* next = reinterpret_cast<const char*>(w + (t + kCols) * tile_elems);
          for (int64_t r = row0, group = 0; r < row_end; r += kRows, ++group) {
            const int rows = row_end - r >= kRows ? kRows : static_cast<int>(row_end - r);
            const bool prefetch = sizeof(W) == 2 && r == row0;
            Ahead ahead;
            if (group > 0 && next_lines) {
              const int64_t from = next_lines * (group - 1) / later, to = next_lines * group / later;
              ahead = Ahead{next + 64 * from, to - from};
            }
            if (tiles == kCols) row_group<kCols>(x + r * K, K, block, tile_elems, rows, prefetch, acc, ahead);
            else row_group<2>(x + r * K, K, block, tile_elems, rows, prefetch, acc, ahead);
            if (tiles == kCols) store_group<kCols>(acc, rows, 16 * t, N, scales, bias, y + r * N);
            else store_group<2>(acc, rows, 16 * t, N, scales, bias, y + r * N);
          }
        }
      }
    }
  }
}

}  // namespace

extern "C" int tgi_vec_gemm_available() { return 1; }

// x [M, K] (rows contiguous), w packed as above for N outputs, bias [N] or null,
// y [M, N]; all bf16. M >= 1, K % 32 == 0.
extern "C" void tgi_vec_linear_bf16(const bf16* x, int64_t M, int64_t K, const bf16* w,
                                    int64_t N, const bf16* bias, bf16* y) {
  linear<bf16>(x, M, K, w, N, nullptr, bias, y);
}

// The same with int8 weights (packed alike, one byte per value) and one bf16 scale per
// output feature: y = (x @ q^T) * scales + bias, float32 until the one rounding.
extern "C" void tgi_vec_linear_int8(const bf16* x, int64_t M, int64_t K, const int8_t* w,
                                    int64_t N, const bf16* scales, const bf16* bias, bf16* y) {
  linear<int8_t>(x, M, K, w, N, scales, bias, y);
}

#else  // no AVX-512 BF16 at build time: the library loads, says so, and is never called

extern "C" int tgi_vec_gemm_available() { return 0; }
extern "C" void tgi_vec_linear_bf16(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t,
                                    const uint16_t*, uint16_t*) {}
extern "C" void tgi_vec_linear_int8(const uint16_t*, int64_t, int64_t, const int8_t*, int64_t,
                                    const uint16_t*, const uint16_t*, uint16_t*) {}

#endif
