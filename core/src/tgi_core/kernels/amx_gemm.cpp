// bf16 linear layers on Intel AMX: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), float32
// accumulation, bf16 output rounded to nearest even; W in bf16, or in int8 with one
// scale per output feature (widened to bf16 tiles here, exact, scaled at the store).
//
// Why not oneDNN: at decode batch sizes a linear layer is a stream over its weight, and
// oneDNN's AMX matmul on a prepacked weight read it at 14-19 GB/s on this project's
// machine, where a plain prefetched read reaches 28-29 GB/s (docs/benchmarks.md).
// This kernel reads the weight once per call, in the order it is stored, prefetching
// 4 KB ahead, and reuses each weight tile across up to 32 rows of x.
//
// Weight layout (tgi_core.model.layers.amx_gemm.pack): W padded with zero rows to a
// multiple of 32 output features, then [N/16 tiles][K/32 steps][16 k-pairs][16 cols][2],
// i.e. each 1 KB block is the B operand of one TDPBF16PS: 32 k values by 16 outputs.
// K must be a multiple of 32.
//
// Parallelism: OpenMP threads split the output features in blocks of 32 (two B tiles),
// so each thread streams a contiguous part of the weight and writes its own columns.
// Rows go in chunks of 32 (two A tiles), in super-blocks of 512 so a long prefill's
// rows stay in L2 while a block of weights is reused across them.

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#include <immintrin.h>
#include <omp.h>

#include "amx_tiles.h"
#include "int8_widen.h"

namespace {

typedef uint16_t bf16;

constexpr int64_t kTileBytes = 1024;      // one B tile: 16 k-pairs x 16 columns x bf16 x 2
constexpr int64_t kTileElems = kTileBytes / 2;
constexpr int64_t kPrefetchAhead = 4096;  // bytes of weight to prefetch ahead of the load
constexpr int64_t kSuperRows = 512;
// int8 weights: above this many row groups of 16 in a super-block, each block of
// weights is widened to bf16 once for all of them (an L2 copy), not once per pair
constexpr int64_t kWidenOnceGroups = 8;

// tiles 0-3: C (row group 0/1 x column tile 0/1), 4-5: A (row group 0/1), 6-7: B
void configure_tiles(int rows) {
  TileConfig config;
  memset(&config, 0, sizeof config);
  config.palette_id = 1;
  for (int tile = 0; tile < 8; ++tile) {
    config.rows[tile] = tile >= 6 ? 16 : rows;
    config.colsb[tile] = 64;
  }
  _tile_loadconfig(&config);
}

template <typename W>
inline void prefetch_tile(const W* tile) {
  const char* bytes = reinterpret_cast<const char*>(tile) + kPrefetchAhead;
  for (int line = 0; line < kTileElems * int64_t(sizeof(W)) / 64; ++line)
    _mm_prefetch(bytes + 64 * line, _MM_HINT_T0);
}

// C tiles = one or two row groups of A (rows from a0 / a1, K elements apart) times the
// two column tiles b0 / b1, over all of K. int8 weights are widened to bf16 tiles in
// ``scratch`` (two 1 KB tiles, 64-byte aligned) first.
template <bool kTwoGroups, typename W>
inline void multiply(const bf16* a0, const bf16* a1, int64_t K, const W* b0, const W* b1,
                     int64_t k_steps, bf16* scratch) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (kTwoGroups) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t step = 0; step < k_steps; ++step) {
    const W* tile0 = b0 + step * kTileElems;
    const W* tile1 = b1 + step * kTileElems;
    prefetch_tile(tile0);
    prefetch_tile(tile1);
    if constexpr (std::is_same_v<W, int8_t>) {
      widen_tile(tile0, scratch);
      widen_tile(tile1, scratch + kTileElems);
      _tile_loadd(6, scratch, 64);
      _tile_loadd(7, scratch + kTileElems, 64);
    } else {
      _tile_loadd(6, tile0, 64);
      _tile_loadd(7, tile1, 64);
    }
    _tile_loadd(4, a0 + step * 32, K * 2);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (kTwoGroups) {
      _tile_loadd(5, a1 + step * 32, K * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
}

template <typename W>
void linear(const bf16* x, int64_t M, int64_t K, const W* w, int64_t N, const bf16* scales,
            const bf16* bias, bf16* y) {
  const int64_t k_steps = K / 32;
  const int64_t col_blocks = (N + 31) / 32;
  const int64_t full_groups = M / 16, groups = (M + 15) / 16;
  const int tail_rows = static_cast<int>(M % 16);
  // a last partial group of a batch above 16 rows is read from a zero-padded copy (a
  // tile has one row count); below 16 rows the tiles are configured to M rows instead
  bf16* tail = nullptr;
  if (M > 16 && tail_rows) {
    tail = static_cast<bf16*>(aligned_alloc(64, 16 * K * 2));
    memcpy(tail, x + full_groups * 16 * K, tail_rows * K * 2);
    memset(tail + tail_rows * K, 0, (16 - tail_rows) * K * 2);
  }
  auto group_rows = [&](int64_t g) -> const bf16* { return g < full_groups || !tail ? x + g * 16 * K : tail; };
  auto group_count = [&](int64_t g) -> int { return g < full_groups ? 16 : tail_rows; };

#pragma omp parallel
  {
    const int thread = omp_get_thread_num(), threads = omp_get_num_threads();
    const int64_t first = col_blocks * thread / threads, last = col_blocks * (thread + 1) / threads;
    if (first < last) {
      configure_tiles(M < 16 ? static_cast<int>(M) : 16);
      alignas(64) float acc[16 * 16];
      alignas(64) bf16 scratch[2 * kTileElems];
      // int8 blocks that several row-group pairs multiply are widened once, here
      bf16* wide = nullptr;
      if (std::is_same_v<W, int8_t> && groups > kWidenOnceGroups)
        wide = static_cast<bf16*>(aligned_alloc(64, 2 * k_steps * kTileBytes));
      const int64_t super_groups = kSuperRows / 16;
      // row groups [g_start, g_end) times one block of 32 columns (tiles b0 / b1)
      auto run_groups = [&](auto b0, auto b1, int64_t g_start, int64_t g_end, int64_t col0) {
        for (int64_t g = g_start; g < g_end; g += 2) {
          bf16* y0 = y + g * 16 * N;
          const int rows0 = group_count(g);
          if (g + 1 < g_end) {
            multiply<true>(group_rows(g), group_rows(g + 1), K, b0, b1, k_steps, scratch);
            const int rows1 = group_count(g + 1);
            _tile_stored(0, acc, 64);
            store_columns(acc, rows0, col0, N, scales, bias, y0, N);
            _tile_stored(1, acc, 64);
            store_columns(acc, rows0, col0 + 16, N, scales, bias, y0, N);
            _tile_stored(2, acc, 64);
            store_columns(acc, rows1, col0, N, scales, bias, y0 + 16 * N, N);
            _tile_stored(3, acc, 64);
            store_columns(acc, rows1, col0 + 16, N, scales, bias, y0 + 16 * N, N);
          } else {
            multiply<false>(group_rows(g), nullptr, K, b0, b1, k_steps, scratch);
            _tile_stored(0, acc, 64);
            store_columns(acc, rows0, col0, N, scales, bias, y0, N);
            _tile_stored(1, acc, 64);
            store_columns(acc, rows0, col0 + 16, N, scales, bias, y0, N);
          }
        }
      };
      for (int64_t g_start = 0; g_start < groups; g_start += super_groups) {
        const int64_t g_end = g_start + super_groups < groups ? g_start + super_groups : groups;
        for (int64_t block = first; block < last; ++block) {
          const W* b0 = w + 2 * block * k_steps * kTileElems;
          const W* b1 = b0 + k_steps * kTileElems;
          if constexpr (std::is_same_v<W, int8_t>) {
            if (wide != nullptr && g_end - g_start > kWidenOnceGroups) {
              for (int64_t t = 0; t < 2 * k_steps; ++t) widen_tile(b0 + t * kTileElems, wide + t * kTileElems);
              const bf16* wide0 = wide;
              run_groups(wide0, wide0 + k_steps * kTileElems, g_start, g_end, 32 * block);
              continue;
            }
          }
          run_groups(b0, b1, g_start, g_end, 32 * block);
        }
      }
      free(wide);
      _tile_release();
    }
  }
  free(tail);
}

}  // namespace

extern "C" int tgi_amx_available() { return 1; }

// Asks the kernel for permission to use the AMX tile state (Linux 5.16+); 0 on success.
extern "C" int tgi_amx_init() { return request_amx_permission(); }

// x [M, K] (rows contiguous), w packed as above for N outputs, bias [N] or null,
// y [M, N]; all bf16. M >= 1, K % 32 == 0.
extern "C" void tgi_amx_linear_bf16(const bf16* x, int64_t M, int64_t K, const bf16* w,
                                    int64_t N, const bf16* bias, bf16* y) {
  linear<bf16>(x, M, K, w, N, nullptr, bias, y);
}

// The same with int8 weights (packed alike, one byte per value) and one bf16 scale per
// output feature: y = (x @ q^T) * scales + bias, float32 until the one rounding.
extern "C" void tgi_amx_linear_int8(const bf16* x, int64_t M, int64_t K, const int8_t* w,
                                    int64_t N, const bf16* scales, const bf16* bias, bf16* y) {
  linear<int8_t>(x, M, K, w, N, scales, bias, y);
}

#else  // no AMX at build time: the library loads, says so, and is never called

extern "C" int tgi_amx_available() { return 0; }
extern "C" int tgi_amx_init() { return -1; }
extern "C" void tgi_amx_linear_bf16(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t,
                                    const uint16_t*, uint16_t*) {}
extern "C" void tgi_amx_linear_int8(const uint16_t*, int64_t, int64_t, const int8_t*, int64_t,
                                    const uint16_t*, const uint16_t*, uint16_t*) {}

#endif
