// Paged decode attention on CPU: one query token per sequence over its cached keys and
// values, read in place from the paged cache (no gathered copy).
//
// Built at first use by tgi_core/kernels (g++ -O3 -march=native -fopenmp)
// and called through ctypes, which releases the GIL. Layouts: q and out [S, H, D]; each
// cache [slots, Hkv, D] (slot = block * block_size + offset); block_tables [S,
// max_blocks]; seq_lens [S]. The query heads h * G .. h * G + G - 1 share key/value head
// h (G = H / Hkv). Scores and sums in float32; bf16 out rounded to nearest even.
// Optionally an additive bias per (sequence, query head, position) (T5's relative
// position bias), float32 [S][H][bias_stride]; no masks or windows: the caller keeps
// those on its general path.
//
// Three paths: bf16 caches with head size 64 or 128 on AVX-512 BF16 take one pass over a
// sequence's positions, 16 at a time, keys and values of a block together, with a
// running max and sum per query head (attend_blocks); where the build has AMX, the OS
// grants it (tgi_paged_decode_use_tiles) and a cache block holds a multiple of 16
// positions, the same pass computes a block's scores as tile products (attend_tiles);
// everything else takes three passes (scores, softmax, weighted values). Optionally the
// step's new key and value rows are written to their slots first, by the thread that
// then reads them.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "exp_nonpositive.h"
#include <type_traits>
#include <vector>

#include <omp.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include "amx_tiles.h"
#endif

namespace {

using ::exp_nonpositive;  // scalar and 16 lanes (exp_nonpositive.h)

// Position l of a sequence in a cache laid out [slots, Hkv, D]: its row of Hkv * D
// values (``stride``), found through the sequence's block table.
template <typename T>
inline const T* cache_row(const T* cache, const int64_t* table, int64_t l, int64_t block_size,
                          int64_t stride) {
  return cache + (table[l / block_size] * block_size + l % block_size) * stride;
}

// Positions prefetched ahead, into L2 (locality 1: prefetcht2). On an AMD EPYC (Zen 4)
// the vector path read 283 MB of keys and values a step at 12.5 GB/s prefetching 16
// positions into L1 (no faster than no prefetching at all), ~17 GB/s with 32 into L2.
constexpr int64_t kAhead = 32;
constexpr int kLocality = 1;

// The blocks of a sequence are scattered through the cache: fetch ``bytes`` of the row
// kAhead positions after l (from ``offset`` elements into it) while l is computed.
template <typename T>
inline void prefetch_ahead(const T* cache, const int64_t* table, int64_t l, int64_t len,
                           int64_t block_size, int64_t stride, int64_t offset, int64_t bytes) {
  if (l + kAhead >= len) return;
  const char* ahead = reinterpret_cast<const char*>(
      cache_row(cache, table, l + kAhead, block_size, stride) + offset);
  for (int64_t byte = 0; byte < bytes; byte += 64) __builtin_prefetch(ahead + byte, 0, kLocality);
}

// The first kAhead positions of a sequence (whole rows of keys and values), fetched
// while another is computed: prefetch_ahead reaches only within a sequence.
template <typename T>
inline void prefetch_start(const T* k_cache, const T* v_cache, const int64_t* table, int64_t len,
                           int64_t block_size, int64_t stride) {
  for (int64_t l = 0; l < std::min(kAhead, len); ++l) {
    const char* k = reinterpret_cast<const char*>(cache_row(k_cache, table, l, block_size, stride));
    const char* v = reinterpret_cast<const char*>(cache_row(v_cache, table, l, block_size, stride));
    for (int64_t byte = 0; byte < stride * int64_t(sizeof(T)); byte += 64) {
      __builtin_prefetch(k + byte, 0, kLocality);
      __builtin_prefetch(v + byte, 0, kLocality);
    }
  }
}

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline void from_float(float x, float* out) { *out = x; }
inline void from_float(float x, uint16_t* out) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    *out = 0x7fc0;  // NaN
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  *out = static_cast<uint16_t>(bits >> 16);
}

#if defined(__AVX512BF16__)
constexpr bool kBf16Dot = true;
// [sum(v[0]), ..., sum(v[15])]: the horizontal sums of 16 vectors in 45 instructions
// (pairs, then quads, then across the 128-bit lanes), not 16 separate reductions
inline __m512 sum16(__m512* v) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // each 128-bit lane of quads[i] holds four vectors' partial sums over that lane
  auto fold = [](__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xdd));
  };
  return fold(fold(quads[0], quads[1]), fold(quads[2], quads[3]));
}

// scores[j * len + l0 + i] = scale * q_j . k_(l0 + i) for the n < 16 rows (kN: exactly 16,
// unrolled into registers), every query head j < count; the key/value head of j is
// at (j / G) * D in each row. bf16 products (exact), float32 sums.
template <int kN>
inline void score_rows(const uint16_t* q, const uint16_t* const* rows, int n, int64_t G,
                       int64_t D, int64_t count, __m512 scale, float* scores, int64_t len) {
  const int rows_here = kN ? kN : n;
  for (int64_t j = 0; j < count; ++j) {
    const uint16_t* qj = q + j * D;
    const int64_t head = (j / G) * D;
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(qj + d);
      for (int i = 0; i < rows_here; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], qv, (__m512bh)_mm512_loadu_si512(rows[i] + head + d));
    }
    const __mmask16 mask = static_cast<__mmask16>((1u << rows_here) - 1);
    _mm512_mask_storeu_ps(scores + j * len, mask, _mm512_mul_ps(sum16(acc), scale));
  }
}

// All of a sequence's scores, 16 positions at a time, so the dot products need no
// horizontal reduction each (``sum16``); kv_offset: the first key/value head's column
inline void score_bf16(const uint16_t* q, const uint16_t* k_cache, const int64_t* table,
                       int64_t len, int64_t G, int64_t D, int64_t block_size, int64_t stride,
                       int64_t kv_offset, int64_t count, float scale, float* scores) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t l0 = 0; l0 < len; l0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, len - l0));
    const uint16_t* rows[16];
    for (int i = 0; i < n; ++i) {
      rows[i] = cache_row(k_cache, table, l0 + i, block_size, stride) + kv_offset;
      prefetch_ahead(k_cache, table, l0 + i, len, block_size, stride, kv_offset,
                     (count / G) * D * 2);
    }
    if (n == 16) score_rows<16>(q, rows, n, G, D, count, scale_v, scores + l0, len);
    else score_rows<0>(q, rows, n, G, D, count, scale_v, scores + l0, len);
  }
}

inline __m512 load_bf16(const uint16_t* x) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)x)), 16));
}

// acc[g] = acc[g] * rescale[g] + sum_i p[g * head_step + i * row_step] * v_i for GT query
// heads sharing a value head, over the n rows of one 16-position block; accumulators in
// registers
template <int64_t D, int GT>
inline void weigh_block(float* acc, const float* p, int64_t head_step, int64_t row_step,
                        const float* rescale, const uint16_t* const* rows, int64_t offset,
                        int n, const uint16_t* const* ahead) {
  __m512 a[GT][D / 16];
  for (int g = 0; g < GT; ++g) {
    const __m512 factor = _mm512_set1_ps(rescale[g]);
    for (int c = 0; c < D / 16; ++c) a[g][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + g * D + 16 * c), factor);
  }
  for (int i = 0; i < n; ++i) {
    if (ahead != nullptr)  // a later block's keys and values, a few lines per row
      for (int half = 0; half < 2; ++half)
        for (int64_t byte = 0; byte < D * 2; byte += 64)
          _mm_prefetch(reinterpret_cast<const char*>(ahead[i + 16 * half] + offset) + byte, _MM_HINT_T0);
    __m512 row[D / 16];
    for (int c = 0; c < D / 16; ++c) row[c] = load_bf16(rows[i] + offset + 16 * c);
    for (int g = 0; g < GT; ++g) {
      const __m512 weight = _mm512_set1_ps(p[g * head_step + i * row_step]);
      for (int c = 0; c < D / 16; ++c) a[g][c] = _mm512_fmadd_ps(weight, row[c], a[g][c]);
    }
  }
  for (int g = 0; g < GT; ++g)
    for (int c = 0; c < D / 16; ++c) _mm512_storeu_ps(acc + g * D + 16 * c, a[g][c]);
}

// Every value head's weighted rows of one block into acc ([count][D]): weigh_block over
// the query heads of each, GT at a time (as many accumulators as fit the 32 registers).
// The weight of query head j and row i is p[j * head_step + i * row_step].
template <int64_t D>
inline void weigh_heads(float* acc, const float* p, int64_t head_step, int64_t row_step,
                        const float* rescale, const uint16_t* const* rows, int64_t h0,
                        int64_t heads, int64_t G, int n,
                        const uint16_t* const* ahead = nullptr) {
  constexpr int kTile = D <= 64 ? 4 : 2;
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t offset = (h0 + h) * D;
    for (int64_t g = 0; g < G; g += kTile) {
      const int64_t j = h * G + g;
      float* a = acc + j * D;
      const float* pj = p + j * head_step;
      const float* rj = rescale + j;
      const uint16_t* const* pf = g == 0 ? ahead : nullptr;
      switch (std::min<int64_t>(kTile, G - g)) {
        case 4: weigh_block<D, (kTile >= 4 ? 4 : 1)>(a, pj, head_step, row_step, rj, rows, offset, n, pf); break;
        case 3: weigh_block<D, (kTile >= 3 ? 3 : 1)>(a, pj, head_step, row_step, rj, rows, offset, n, pf); break;
        case 2: weigh_block<D, 2>(a, pj, head_step, row_step, rj, rows, offset, n, pf); break;
        default: weigh_block<D, 1>(a, pj, head_step, row_step, rj, rows, offset, n, pf);
      }
    }
  }
}

// One work item in a single pass over the positions, 16 at a time (flash-decoding):
// each block's keys and values are read together, its scores folded into a running
// max and sum per query head (the accumulated values rescaled when the max grows).
// scratch: count * (D + 19) floats, count = query heads of the item.
template <int64_t D>
void attend_blocks(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache,
                   const int64_t* table, int64_t len, uint16_t* out, int64_t G, int64_t Hkv,
                   int64_t block_size, float scale, int64_t h0, int64_t heads, float* scratch,
                   const float* bias, int64_t bias_stride) {
  const int64_t count = heads * G, stride = Hkv * D, kv_offset = h0 * D;
  float* acc = scratch;               // [count][D]
  float* p = acc + count * D;         // [count][16]: one block's scores, then weights
  float* running_max = p + count * 16;
  float* total = running_max + count;
  float* rescale = total + count;
  std::fill(acc, acc + count * D, 0.f);
  std::fill(running_max, running_max + count, -INFINITY);
  std::fill(total, total + count, 0.f);
  const __m512 scale_v = _mm512_set1_ps(scale);
  const int64_t row_bytes = heads * D * 2;
  for (int64_t l0 = 0; l0 < len; l0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, len - l0));
    const uint16_t* k_rows[16];
    const uint16_t* v_rows[16];
    for (int i = 0; i < n; ++i) {
      const int64_t slot = table[(l0 + i) / block_size] * block_size + (l0 + i) % block_size;
      k_rows[i] = k_cache + slot * stride + kv_offset;
      v_rows[i] = v_cache + slot * stride;
      prefetch_ahead(k_cache, table, l0 + i, len, block_size, stride, kv_offset, row_bytes);
      prefetch_ahead(v_cache, table, l0 + i, len, block_size, stride, kv_offset, row_bytes);
    }
    if (n == 16) score_rows<16>(q, k_rows, n, G, D, count, scale_v, p, 16);
    else score_rows<0>(q, k_rows, n, G, D, count, scale_v, p, 16);
    const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
    if (bias != nullptr)  // query head j's bias row, positions l0 .. l0 + n
      for (int64_t j = 0; j < count; ++j)
        _mm512_mask_storeu_ps(p + j * 16, valid,
                              _mm512_add_ps(_mm512_maskz_loadu_ps(valid, p + j * 16),
                                            _mm512_maskz_loadu_ps(valid, bias + j * bias_stride + l0)));
    for (int64_t j = 0; j < count; ++j) {
      const __m512 scores = _mm512_maskz_loadu_ps(valid, p + j * 16);
      const float block_max = _mm512_mask_reduce_max_ps(valid, scores);
      const float new_max = std::max(running_max[j], block_max);
      rescale[j] = std::exp(running_max[j] - new_max);  // 0 for the first block
      const __m512 weights =
          _mm512_maskz_mov_ps(valid, exp_nonpositive(_mm512_sub_ps(scores, _mm512_set1_ps(new_max))));
      _mm512_storeu_ps(p + j * 16, weights);
      total[j] = total[j] * rescale[j] + _mm512_reduce_add_ps(weights);
      running_max[j] = new_max;
    }
    weigh_heads<D>(acc, p, 16, 1, rescale, v_rows, h0, heads, G, n, nullptr);
  }
  for (int64_t j = 0; j < count; ++j) {
    const float inverse = 1.f / total[j];
    for (int64_t d = 0; d < D; ++d) from_float(acc[j * D + d] * inverse, out + j * D + d);
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define TGI_DECODE_TILES 1
constexpr bool kTiles = true;
constexpr int64_t kAheadBlocks = 2;  // 16-position blocks prefetched ahead by attend_tiles

// Tiles for the scores of one block: 0 holds C, [16 positions][16 query heads] float32;
// 1 a block's keys of one key/value head (A: 16 rows of 32 values, the cache's row
// stride); 2 the matching queries (B, packed by pack_queries).
inline void configure_score_tiles() {
  TileConfig config{};
  config.palette_id = 1;
  for (int tile = 0; tile < 3; ++tile) {
    config.rows[tile] = 16;
    config.colsb[tile] = 64;
  }
  _tile_loadconfig(&config);
}
inline void release_score_tiles() { _tile_release(); }

// The item's count <= 16 query heads as TDPBF16PS B operands: [heads][D / 32][16 pairs of
// dimensions][16 columns][2]; column j is query head j where j belongs to key/value head
// h (j / G == h), zero elsewhere, so the sum over every (h, chunk) tile product gives
// each head its own key's dot product.
template <int64_t D>
void pack_queries(const uint16_t* q, int64_t G, int64_t heads, uint16_t* packed) {
  constexpr int64_t kChunks = D / 32;
  std::fill(packed, packed + heads * kChunks * 512, uint16_t{0});
  for (int64_t j = 0; j < heads * G; ++j) {
    const int64_t h = j / G;
    for (int64_t d = 0; d < D; ++d)
      packed[((h * kChunks + d / 32) * 16 + (d % 32) / 2) * 32 + 2 * j + d % 2] = q[j * D + d];
  }
}

// Per-thread buffers of attend_tiles: packed queries, one block's scores and weights
// ([16 positions][16 heads]), the accumulated values and the running statistics.
struct TileScratch {
  std::vector<uint16_t> queries;
  std::vector<float> acc;
  alignas(64) float scores[256];
  alignas(64) float weights[256];
  alignas(64) float rescale[16];
  alignas(64) float total[16];
  TileScratch(int64_t H, int64_t D) : queries(H * D * 16), acc(H * D) {}
};

// attend_blocks with the scores on AMX, for a cache whose 16-position runs are
// contiguous (block_size % 16 == 0) and an item of count = heads * G <= 16 query heads.
// A block's scores are one tile, [position][query head]: the softmax statistics run 16
// heads to a vector, and the weights are read per (row, head) by weigh_heads. Rows past
// the sequence inside its last block are multiplied (the tile takes 16) but never read.
template <int64_t D>
void attend_tiles(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache,
                  const int64_t* table, int64_t len, uint16_t* out, int64_t G, int64_t Hkv,
                  int64_t block_size, float scale, int64_t h0, int64_t heads,
                  TileScratch& scratch) {
  constexpr int64_t kChunks = D / 32;
  const int64_t count = heads * G, stride = Hkv * D;
  pack_queries<D>(q, G, heads, scratch.queries.data());
  float* acc = scratch.acc.data();
  std::fill(acc, acc + count * D, 0.f);
  __m512 running_max = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();
  const __m512 scale_v = _mm512_set1_ps(scale);
  auto first_slot = [&](int64_t l0) {
    return table[l0 / block_size] * block_size + l0 % block_size;
  };
  for (int64_t l0 = 0, slot0 = first_slot(0); l0 < len; l0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, len - l0));
    const int64_t next = l0 + 16 < len ? first_slot(l0 + 16) : -1;
    // rows kAheadBlocks blocks on: weigh_heads prefetches their keys and values as it
    // goes, a few lines per row (a burst of them all would stall on the fill buffers)
    const uint16_t* ahead_rows[32];
    const bool prefetch = l0 + 16 * kAheadBlocks < len;
    if (prefetch) {
      const int64_t at = first_slot(l0 + 16 * kAheadBlocks);
      for (int64_t i = 0; i < 16; ++i) {
        ahead_rows[i] = k_cache + (at + i) * stride;
        ahead_rows[16 + i] = v_cache + (at + i) * stride;
      }
    }
    const uint16_t* keys = k_cache + slot0 * stride + h0 * D;
    _tile_zero(0);
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t c = 0; c < kChunks; ++c) {
        _tile_loadd(1, keys + h * D + c * 32, stride * 2);
        _tile_loadd(2, scratch.queries.data() + (h * kChunks + c) * 512, 64);
        _tile_dpbf16ps(0, 1, 2);
      }
    _tile_stored(0, scratch.scores, 64);
    __m512 block_max = _mm512_load_ps(scratch.scores);
    for (int i = 1; i < n; ++i) block_max = _mm512_max_ps(block_max, _mm512_load_ps(scratch.scores + 16 * i));
    const __m512 new_max = _mm512_max_ps(running_max, _mm512_mul_ps(block_max, scale_v));
    const __m512 rescale = exp_nonpositive(_mm512_sub_ps(running_max, new_max));  // ~0 at first
    __m512 sum = _mm512_setzero_ps();
    for (int i = 0; i < n; ++i) {
      const __m512 scaled = _mm512_mul_ps(_mm512_load_ps(scratch.scores + 16 * i), scale_v);
      const __m512 weight = exp_nonpositive(_mm512_sub_ps(scaled, new_max));
      _mm512_store_ps(scratch.weights + 16 * i, weight);
      sum = _mm512_add_ps(sum, weight);
    }
    total = _mm512_fmadd_ps(total, rescale, sum);
    running_max = new_max;
    _mm512_store_ps(scratch.rescale, rescale);
    const uint16_t* v_rows[16];
    for (int i = 0; i < n; ++i) v_rows[i] = v_cache + (slot0 + i) * stride;
    weigh_heads<D>(acc, scratch.weights, 1, 16, scratch.rescale, v_rows, h0, heads, G, n,
                   prefetch ? ahead_rows : nullptr);
    slot0 = next;
  }
  _mm512_store_ps(scratch.total, total);
  for (int64_t j = 0; j < count; ++j) {
    const float inverse = 1.f / scratch.total[j];
    for (int64_t d = 0; d < D; ++d) from_float(acc[j * D + d] * inverse, out + j * D + d);
  }
}
#endif

#else  // never called: the branches that would are discarded at compile time
constexpr bool kBf16Dot = false;
inline void score_bf16(const uint16_t*, const uint16_t*, const int64_t*, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int64_t, int64_t, float, float*) {}
template <int64_t D>
void attend_blocks(const uint16_t*, const uint16_t*, const uint16_t*, const int64_t*, int64_t,
                   uint16_t*, int64_t, int64_t, int64_t, float, int64_t, int64_t, float*,
                   const float*, int64_t) {}
#endif

#if !defined(TGI_DECODE_TILES)  // never called: kTiles is false
constexpr bool kTiles = false;
struct TileScratch {
  TileScratch(int64_t, int64_t) {}
};
inline void configure_score_tiles() {}
inline void release_score_tiles() {}
inline int request_amx_permission() { return -1; }
template <int64_t D>
void attend_tiles(const uint16_t*, const uint16_t*, const uint16_t*, const int64_t*, int64_t,
                  uint16_t*, int64_t, int64_t, int64_t, float, int64_t, int64_t, TileScratch&) {}
#endif


// scores[j * len + l] = scale * q_j . k_l for the query heads j of key/value heads
// [h0, h0 + heads) (G per key/value head) and the sequence's positions l < len.
template <typename T, int64_t FixedD>
void score(const T* q, const T* k_cache, const int64_t* table, int64_t len, int64_t G,
           int64_t Hkv, int64_t AnyD, int64_t block_size, float scale, int64_t h0,
           int64_t heads, float* qf, float* row, float* scores) {
  const int64_t D = FixedD ? FixedD : AnyD, stride = Hkv * D;
  if constexpr (std::is_same_v<T, uint16_t> && kBf16Dot) {
    if (D % 32 == 0) {  // bf16 dot products straight from the cache (AVX-512 BF16)
      score_bf16(q, k_cache, table, len, G, D, block_size, stride, h0 * D, heads * G, scale,
                 scores);
      return;
    }
  }
  for (int64_t i = 0; i < heads * G * D; ++i) qf[i] = to_float(q[i]) * scale;
  for (int64_t l = 0; l < len; ++l) {
    const T* k = cache_row(k_cache, table, l, block_size, stride) + h0 * D;
#pragma omp simd
    for (int64_t i = 0; i < heads * D; ++i) row[i] = to_float(k[i]);
    for (int64_t j = 0; j < heads * G; ++j) {
      const float* qj = qf + j * D;
      const float* kj = row + (j / G) * D;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qj[d] * kj[d];
      scores[j * len + l] = dot;
    }
  }
}

// Each of the ``count`` rows of scores becomes exp(score - max); inv_total[j] is one
// over the row's sum (applied to the weighted sum, not to every weight).
inline void softmax_rows(float* scores, int64_t count, int64_t len, float* inv_total) {
  for (int64_t j = 0; j < count; ++j) {
    float* sc = scores + j * len;
    float m = sc[0];
#pragma omp simd reduction(max : m)
    for (int64_t l = 1; l < len; ++l) m = std::max(m, sc[l]);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t l = 0; l < len; ++l) {
      sc[l] = exp_nonpositive(sc[l] - m);
      total += sc[l];
    }
    inv_total[j] = 1.f / total;
  }
}

// acc[j * D + d] = sum_l weights[j * len + l] * v_l[d], for the same query heads.
template <typename T, int64_t FixedD>
void weigh(const T* v_cache, const int64_t* table, int64_t len, int64_t G, int64_t Hkv,
           int64_t AnyD, int64_t block_size, int64_t h0, int64_t heads, const float* weights,
           float* row, float* acc) {
  // bf16 heads of 64 or 128 never come here (attend_blocks / attend_tiles take them)
  const int64_t D = FixedD ? FixedD : AnyD, stride = Hkv * D;
  std::fill(acc, acc + heads * G * D, 0.f);
  for (int64_t l = 0; l < len; ++l) {
    const T* v = cache_row(v_cache, table, l, block_size, stride) + h0 * D;
#pragma omp simd
    for (int64_t i = 0; i < heads * D; ++i) row[i] = to_float(v[i]);
    for (int64_t j = 0; j < heads * G; ++j) {
      const float p = weights[j * len + l];
      float* a = acc + j * D;
      const float* vj = row + (j / G) * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += p * vj[d];
    }
  }
}

// Whether the AMX score path may run: the library has it and the OS granted the tiles.
bool g_tiles = false;

// One work item: a sequence's key/value heads [h0, h1) and all their query heads; with
// ``tiles``, through attend_tiles (the caller checked its conditions).
template <typename T, int64_t FixedD>
void attend(const T* q, const T* k_cache, const T* v_cache, const int64_t* table, int64_t len,
            T* out, int64_t H, int64_t Hkv, int64_t AnyD, int64_t block_size, float scale,
            int64_t h0, int64_t h1, float* qf, float* scores, float* acc, float* row,
            float* inv_total, float* block_scratch, TileScratch* tiles, const float* bias,
            int64_t bias_stride) {
  const int64_t D = FixedD ? FixedD : AnyD;
  const int64_t G = H / Hkv, heads = h1 - h0, first = h0 * G * D;
  if constexpr (std::is_same_v<T, uint16_t> && kBf16Dot && (FixedD == 64 || FixedD == 128)) {
    if (tiles != nullptr) {
      attend_tiles<FixedD>(q + first, k_cache, v_cache, table, len, out + first, G, Hkv,
                           block_size, scale, h0, heads, *tiles);
      return;
    }
    attend_blocks<FixedD>(q + first, k_cache, v_cache, table, len, out + first, G, Hkv,
                          block_size, scale, h0, heads, block_scratch,
                          bias ? bias + h0 * G * bias_stride : nullptr, bias_stride);
    return;
  }
  score<T, FixedD>(q + first, k_cache, table, len, G, Hkv, D, block_size, scale, h0, heads, qf,
                   row, scores);
  if (bias != nullptr)
    for (int64_t j = 0; j < heads * G; ++j)
      for (int64_t l = 0; l < len; ++l) scores[j * len + l] += bias[(h0 * G + j) * bias_stride + l];
  softmax_rows(scores, heads * G, len, inv_total);
  weigh<T, FixedD>(v_cache, table, len, G, Hkv, D, block_size, h0, heads, scores, row, acc);
  for (int64_t j = 0; j < heads * G; ++j)
    for (int64_t d = 0; d < D; ++d) from_float(acc[j * D + d] * inv_total[j], out + first + j * D + d);
}

// The step's new key and value rows, written to their slots by the kernel itself just
// before each sequence attends (row s of k at k + s * k_stride elements, dense inside).
template <typename T>
struct NewRows {
  const T* k;
  const T* v;
  const int64_t* slots;
  int64_t k_stride, v_stride;
};

template <typename T, int64_t FixedD>
void decode(const T* q, T* k_cache, T* v_cache, const int64_t* block_tables,
            const int64_t* seq_lens, T* out, int64_t S, int64_t H, int64_t Hkv, int64_t D,
            int64_t block_size, int64_t max_blocks, float scale, const NewRows<T>* new_rows,
            const float* bias, int64_t bias_stride) {
  int64_t max_len = 1;
  for (int64_t s = 0; s < S; ++s) max_len = std::max(max_len, seq_lens[s]);
  // The AMX score path takes bf16 heads of 64 or 128, runs of 16 positions in one cache
  // block, and items of at most 16 query heads: tile_split items per sequence, the
  // fewest that keep to that (0: no tiles here; nor with a bias, which the vector
  // path adds).
  const int64_t G = H / Hkv;
  int64_t tile_split = 0;
  if constexpr (std::is_same_v<T, uint16_t> && kTiles && (FixedD == 64 || FixedD == 128)) {
    if (g_tiles && block_size % 16 == 0 && bias == nullptr)
      for (int64_t parts = 1; parts <= Hkv && !tile_split; ++parts)
        if (Hkv % parts == 0 && (Hkv / parts) * G <= 16) tile_split = parts;
  }
  // whole sequences (every head reads each cached row once, in order) when there are
  // enough of them to share among the threads; one key/value head per item otherwise
  const int64_t split = S < 2 * omp_get_max_threads() ? Hkv : std::max<int64_t>(tile_split, 1);
  const int64_t heads = Hkv / split;
#pragma omp parallel
  {
    std::vector<float> qf(H * D), scores(H * max_len), acc(H * D), row(Hkv * D), inv(H);
    std::vector<float> block_scratch(H * (D + 19));
    TileScratch tile_scratch(tile_split ? H : 0, D);
    if (tile_split) configure_score_tiles();
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < S * split; ++item) {
      const int64_t s = item / split, h0 = (item % split) * heads;
      if (new_rows != nullptr) {  // this item's heads of the sequence's new token
        const int64_t at = new_rows->slots[s] * Hkv * D + h0 * D;
        std::memcpy(k_cache + at, new_rows->k + s * new_rows->k_stride + h0 * D, heads * D * sizeof(T));
        std::memcpy(v_cache + at, new_rows->v + s * new_rows->v_stride + h0 * D, heads * D * sizeof(T));
      }
      // whole sequences: start fetching the one this thread likely takes next
      // (dynamic scheduling hands items out in turn); ~1 ms of ~16 a step on Zen 4
      const int64_t next = s + omp_get_num_threads();
      if (split == 1 && next < S)
        prefetch_start(k_cache, v_cache, block_tables + next * max_blocks, seq_lens[next],
                       block_size, Hkv * D);
      attend<T, FixedD>(q + s * H * D, k_cache, v_cache, block_tables + s * max_blocks,
                        seq_lens[s], out + s * H * D, H, Hkv, D, block_size, scale, h0,
                        h0 + heads, qf.data(), scores.data(), acc.data(), row.data(), inv.data(),
                        block_scratch.data(), tile_split ? &tile_scratch : nullptr,
                        bias ? bias + s * H * bias_stride : nullptr, bias_stride);
    }
    if (tile_split) release_score_tiles();
  }
}

template <typename T>
int dispatch(const T* q, T* k, T* v, const int64_t* tables, const int64_t* lens, T* out,
             int64_t S, int64_t H, int64_t Hkv, int64_t D, int64_t block_size,
             int64_t max_blocks, float scale, const T* new_k, const T* new_v,
             const int64_t* new_slots, int64_t new_k_stride, int64_t new_v_stride,
             int64_t num_slots, const float* bias, int64_t bias_stride) {
  NewRows<T> rows{new_k, new_v, new_slots, new_k_stride, new_v_stride};
  const NewRows<T>* new_rows = new_k != nullptr ? &rows : nullptr;
  if (new_rows != nullptr)
    for (int64_t s = 0; s < S; ++s)
      if (new_slots[s] < 0 || new_slots[s] >= num_slots) return -1;  // nothing written
  if (D == 64) decode<T, 64>(q, k, v, tables, lens, out, S, H, Hkv, D, block_size, max_blocks, scale, new_rows, bias, bias_stride);
  else if (D == 128) decode<T, 128>(q, k, v, tables, lens, out, S, H, Hkv, D, block_size, max_blocks, scale, new_rows, bias, bias_stride);
  else decode<T, 0>(q, k, v, tables, lens, out, S, H, Hkv, D, block_size, max_blocks, scale, new_rows, bias, bias_stride);
  return 0;
}

}  // namespace

// q [S, H, D] attends over each sequence's cached positions [0, seq_len); with new_k
// (else null), the step's new rows are first written to slots new_slots[s] (each below
// num_slots, else -1 is returned and nothing computed). bias (else null): float32
// [S][H][bias_stride], bias[s][h][l] added to the scaled score of query head h and
// position l. Returns 0.
extern "C" {
int tgi_paged_decode_bf16(const uint16_t* q, uint16_t* k, uint16_t* v, const int64_t* tables,
                          const int64_t* lens, uint16_t* out, int64_t S, int64_t H, int64_t Hkv,
                          int64_t D, int64_t block_size, int64_t max_blocks, float scale,
                          const uint16_t* new_k, const uint16_t* new_v, const int64_t* new_slots,
                          int64_t new_k_stride, int64_t new_v_stride, int64_t num_slots,
                          const float* bias, int64_t bias_stride) {
  return dispatch(q, k, v, tables, lens, out, S, H, Hkv, D, block_size, max_blocks, scale, new_k,
                  new_v, new_slots, new_k_stride, new_v_stride, num_slots, bias, bias_stride);
}
int tgi_paged_decode_f32(const float* q, float* k, float* v, const int64_t* tables,
                         const int64_t* lens, float* out, int64_t S, int64_t H, int64_t Hkv,
                         int64_t D, int64_t block_size, int64_t max_blocks, float scale,
                         const float* new_k, const float* new_v, const int64_t* new_slots,
                         int64_t new_k_stride, int64_t new_v_stride, int64_t num_slots,
                         const float* bias, int64_t bias_stride) {
  return dispatch(q, k, v, tables, lens, out, S, H, Hkv, D, block_size, max_blocks, scale, new_k,
                  new_v, new_slots, new_k_stride, new_v_stride, num_slots, bias, bias_stride);
}
}

// Turns the AMX score path on (asking the OS for the tile state) or off; returns whether
// it is on. Off until called: a library without AMX, or a refused request, stays off.
extern "C" int tgi_paged_decode_use_tiles(int enable) {
  g_tiles = enable && kTiles && request_amx_permission() == 0;
  return g_tiles ? 1 : 0;
}
