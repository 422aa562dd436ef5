// Prefill attention on CPUs with AVX-512 BF16: many queries per sequence (a prompt, a
// chunk over a cached prefix, or a T5 source) in one pass over the keys, flash-style.
//
// Built at first use by tgi_core/kernels (g++ -O3 -march=native -fopenmp) and called
// through ctypes, which releases the GIL. A work item is 16 consecutive queries of one
// sequence and the query heads of one key/value head; each lane of a vector is one
// query. Per tile of 32 positions and query head:
//   scores: 16 vectors per 16 positions, one VDPBF16PS per pair of dimensions and
//           position (the queries' pairs against the key's pair, broadcast from the row);
//   softmax: a running max and sum per lane (query), no horizontal reductions;
//   values: the weights rounded to bf16 in pairs of positions, against the values
//           interleaved in pairs of positions (built once per sequence and head, shared
//           by every item of it), one VDPBF16PS per dimension and pair.
// Keys are read in place: from the paged cache through a block table, or from packed
// rows (a T5 source, not cached). Scores, sums and accumulators are float32; the output
// is bf16, rounded to nearest even. PyTorch's CPU flash attention also rounds the
// weights to bf16 before the weighted sum of bf16 values.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdlib.h>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include <omp.h>

#include "exp_nonpositive.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>

namespace {

constexpr int kLanes = 16;  // queries per item
constexpr int kTile = 32;   // positions per tile

// Where a sequence's keys and values are: a paged cache (``table`` non-null: position l
// at slot table[l / block_size] * block_size + l % block_size) or packed rows from
// ``start``; row strides in elements.
// acc + the pairwise products of a's bf16 pairs with the pair at *b in every lane (the
// broadcast folded into the instruction's memory operand, which compilers do not do
// for this intrinsic: one instruction, not a load and a product)
inline __m512 dot_broadcast(__m512 acc, __m512bh a, const uint32_t* b) {
  asm("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(a), "m"(*b));
  return acc;
}

struct Rows {
  const uint16_t* k;
  const uint16_t* v;
  int64_t k_stride, v_stride;
  const int64_t* table;
  int64_t block_size, start;

  int64_t row(int64_t l) const {
    return table ? table[l / block_size] * block_size + l % block_size : start + l;
  }
};

// A sequence's values of one key/value head, interleaved in pairs of positions:
// out[pair][d] holds (v[2 * pair][d], v[2 * pair + 1][d]) as two bf16 in 32 bits; a
// missing last position is zero (its weight is zero; zero times zero, never NaN).
template <int64_t D>
void interleave_values(const Rows& rows, int64_t len, int64_t column, uint32_t* out) {
  __m512i idx_lo, idx_hi;  // (a[i], b[i]) for i in 0..15, then 16..31
  alignas(64) int16_t lo[32], hi[32];
  for (int i = 0; i < 16; ++i) {
    lo[2 * i] = static_cast<int16_t>(i), lo[2 * i + 1] = static_cast<int16_t>(32 + i);
    hi[2 * i] = static_cast<int16_t>(16 + i), hi[2 * i + 1] = static_cast<int16_t>(48 + i);
  }
  idx_lo = _mm512_load_si512(lo), idx_hi = _mm512_load_si512(hi);
  for (int64_t l = 0; l < len; l += 2) {
    const uint16_t* a = rows.v + rows.row(l) * rows.v_stride + column;
    const uint16_t* b = l + 1 < len ? rows.v + rows.row(l + 1) * rows.v_stride + column : nullptr;
    uint32_t* o = out + (l / 2) * D;
    for (int64_t d = 0; d < D; d += 32) {  // a last 16 dimensions alone (D % 32 == 16)
      const __mmask32 some = D - d >= 32 ? ~__mmask32{0} : __mmask32{0xffff};
      const __m512i x = _mm512_maskz_loadu_epi16(some, a + d);
      const __m512i y = b ? _mm512_maskz_loadu_epi16(some, b + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(o + d, _mm512_permutex2var_epi16(x, idx_lo, y));
      if (D - d >= 32) _mm512_storeu_si512(o + d + 16, _mm512_permutex2var_epi16(x, idx_hi, y));
    }
  }
}

// r[i] holds row i of a 16 x 16 matrix of 32-bit values; afterwards r[j] holds column j
// (pairs, then quads, then across the 128-bit lanes)
inline void transpose16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // r[4g + k], 128-bit lane L: column 4L + k of rows 4g .. 4g + 3
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512i low01 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x44);
    const __m512i high01 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xee);
    const __m512i low23 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x44);
    const __m512i high23 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xee);
    t[k] = _mm512_shuffle_i32x4(low01, low23, 0x88);
    t[4 + k] = _mm512_shuffle_i32x4(low01, low23, 0xdd);
    t[8 + k] = _mm512_shuffle_i32x4(high01, high23, 0x88);
    t[12 + k] = _mm512_shuffle_i32x4(high01, high23, 0xdd);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// One query head's running state over the tiles: the queries as pairs of dimensions
// [D / 2][16 lanes], the weighted values transposed [D][16 lanes], max and sum per lane.
template <int64_t D>
struct HeadState {
  alignas(64) uint32_t q[D / 2][kLanes];
  alignas(64) float acc[D][kLanes];
  __m512 max, sum;
};

struct Item {
  int64_t first;     // the item's first query, within its sequence
  int n;             // queries (lanes used)
  int64_t position;  // the first query's position
  bool causal;
  int64_t len;       // keys the sequence has
  const float* bias;  // this head's relative bias at (query - key position) == 0, or null
};

// scores[p][lane] for the tile's positions p < count (keys: the tile's rows of the
// head, copied together), 16 positions at a time in registers
template <int64_t D>
inline void tile_scores(const HeadState<D>& st, const uint16_t* keys, int count,
                        float (*scores)[kLanes]) {
  for (int p0 = 0; p0 < count; p0 += 16) {
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    const uint32_t* k = reinterpret_cast<const uint32_t*>(keys + p0 * D);
    for (int64_t pair = 0; pair < D / 2; ++pair) {
      const __m512bh qv = (__m512bh)_mm512_load_si512(st.q[pair]);
      for (int i = 0; i < 16; ++i)
        acc[i] = dot_broadcast(acc[i], qv, k + i * D / 2 + pair);
    }
    for (int i = 0; i < 16; ++i) _mm512_store_ps(scores[p0 + i], acc[i]);
  }
}

// One tile of positions [l0, l0 + count) for one query head: scores, the online softmax
// and the weighted values (values: the interleaved pairs of the tile's first position).
template <int64_t D>
inline void tile(HeadState<D>& st, const Item& item, const uint16_t* keys, int64_t l0,
                 int count, const uint32_t* values, float scale) {
  const bool first = l0 == 0;  // the accumulators start here (not read, not rescaled)
  alignas(64) float scores[kTile][kLanes];
  alignas(64) uint32_t weights[kTile / 2][kLanes];
  tile_scores<D>(st, keys, (count + 15) & ~15, scores);
  const __m512 scale_v = _mm512_set1_ps(scale), minus_inf = _mm512_set1_ps(-INFINITY);
  const __m512i lane_pos =
      _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(item.position)),
                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  // masking: positions past the sequence, or after a lane's own (causal)
  const bool edge = count < kTile || (item.causal && l0 + kTile - 1 > item.position);
  __mmask16 valid[kTile];
  __m512 top = st.max;
  for (int p = 0; p < kTile; ++p) {
    __m512 s = _mm512_mul_ps(_mm512_load_ps(scores[p]), scale_v);
    if (item.bias && p < count)
      s = _mm512_add_ps(s, _mm512_loadu_ps(item.bias + item.position - (l0 + p)));
    valid[p] = 0xffff;
    if (edge) {
      const int64_t l = l0 + p;
      valid[p] = p >= count ? 0
                 : item.causal ? _mm512_cmpge_epi32_mask(lane_pos, _mm512_set1_epi32(static_cast<int>(l)))
                               : 0xffff;
      s = _mm512_mask_blend_ps(valid[p], minus_inf, s);
    }
    _mm512_store_ps(scores[p], s);
    top = _mm512_max_ps(top, s);
  }
  const __m512 rescale = exp_nonpositive(_mm512_sub_ps(st.max, top));
  st.max = top;
  __m512 sum = _mm512_setzero_ps();
  // interleaves two vectors of 16 bf16: (a[i], b[i]) in lane i
  alignas(64) int16_t order[32];
  for (int i = 0; i < 16; ++i) order[2 * i] = static_cast<int16_t>(i), order[2 * i + 1] = static_cast<int16_t>(16 + i);
  const __m512i interleave = _mm512_load_si512(order);
  for (int p = 0; p < kTile; p += 2) {
    const __m512 a = _mm512_maskz_mov_ps(valid[p], exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(scores[p]), top)));
    const __m512 b = _mm512_maskz_mov_ps(valid[p + 1], exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(scores[p + 1]), top)));
    sum = _mm512_add_ps(sum, _mm512_add_ps(a, b));
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // a in 0..15, b in 16..31
    _mm512_store_si512(weights[p / 2], _mm512_permutexvar_epi16(interleave, both));
  }
  st.sum = _mm512_fmadd_ps(st.sum, rescale, sum);
  const int pairs = (count + 1) / 2;
  for (int64_t d0 = 0; d0 < D; d0 += 16) {
    __m512 acc[16];
    for (int i = 0; i < 16; ++i)
      acc[i] = first ? _mm512_setzero_ps() : _mm512_mul_ps(_mm512_load_ps(st.acc[d0 + i]), rescale);
    for (int pr = 0; pr < pairs; ++pr) {
      const __m512bh w = (__m512bh)_mm512_load_si512(weights[pr]);
      const uint32_t* v = values + pr * D + d0;
      for (int i = 0; i < 16; ++i)
        acc[i] = dot_broadcast(acc[i], w, v + i);
    }
    for (int i = 0; i < 16; ++i) _mm512_store_ps(st.acc[d0 + i], acc[i]);
  }
}

// One item: its queries of each head sharing key/value head ``kv`` over the positions
// they see, the tiles' keys shared by those heads.
template <int64_t D>
void attend_item(const uint16_t* q, int64_t q_stride, const Rows& rows, const uint32_t* values,
                 uint16_t* out, int64_t H, int64_t Hkv, int64_t kv, Item item, float scale,
                 const float* bias, int64_t bias_stride, int64_t bias_offset,
                 HeadState<D>* states) {
  const int64_t G = H / Hkv;
  for (int64_t g = 0; g < G; ++g) {
    HeadState<D>& st = states[g];
    // the queries' pairs of dimensions, lane by lane (missing lanes zero): 16 pairs of
    // the 16 rows at a time, transposed in registers
    const uint16_t* head_q = q + item.first * q_stride + (kv * G + g) * D;
    for (int64_t p0 = 0; p0 < D / 2; p0 += 16) {
      const __mmask16 pairs = D / 2 - p0 >= 16 ? 0xffff : static_cast<__mmask16>((1u << (D / 2 - p0)) - 1);
      __m512i r[16];
      for (int lane = 0; lane < kLanes; ++lane)
        r[lane] = lane < item.n ? _mm512_maskz_loadu_epi32(pairs, head_q + lane * q_stride + 2 * p0)
                                : _mm512_setzero_si512();
      transpose16(r);
      for (int64_t i = 0; i < std::min<int64_t>(16, D / 2 - p0); ++i) _mm512_store_si512(st.q[p0 + i], r[i]);
    }
    st.max = _mm512_set1_ps(-INFINITY);
    st.sum = _mm512_setzero_ps();
  }
  // keys the last lane sees
  const int64_t end = item.causal ? std::min(item.len, item.position + item.n) : item.len;
  alignas(64) uint16_t keys[kTile * D];
  for (int64_t l0 = 0; l0 < end; l0 += kTile) {
    const int count = static_cast<int>(std::min<int64_t>(kTile, end - l0));
    for (int p = 0; p < kTile; ++p)  // past the end: a copy of the first (masked)
      std::memcpy(keys + p * D, rows.k + rows.row(p < count ? l0 + p : l0) * rows.k_stride + kv * D,
                  D * sizeof(uint16_t));
    for (int64_t g = 0; g < G; ++g) {
      Item head = item;
      head.bias = bias ? bias + (kv * G + g) * bias_stride + bias_offset : nullptr;
      tile<D>(states[g], head, keys, l0, count, values + (l0 / 2) * D, scale);
    }
  }
  // each lane's sums transposed back, 16 dimensions at a time, over the lane's total
  for (int64_t g = 0; g < G; ++g) {
    const HeadState<D>& st = states[g];
    alignas(64) float inv[kLanes];
    _mm512_store_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.f), st.sum));
    uint16_t* o = out + (item.first * H + kv * G + g) * D;
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_castps_si512(_mm512_load_ps(st.acc[d0 + i]));
      transpose16(r);
      for (int lane = 0; lane < item.n; ++lane) {
        const __m512 x = _mm512_mul_ps(_mm512_castsi512_ps(r[lane]), _mm512_set1_ps(inv[lane]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + lane * H * D + d0),
                            (__m256i)_mm512_cvtneps_pbh(x));
      }
    }
  }
}

// Returns 0, or -2 when its buffers cannot be allocated (nothing written).
template <int64_t D>
int prefill(const uint16_t* q, int64_t q_stride, const uint16_t* k, int64_t k_stride,
            const uint16_t* v, int64_t v_stride, uint16_t* out, int64_t S,
            const int64_t* q_start, const int64_t* q_len, const int64_t* q_pos,
            const int64_t* kv_len, const int64_t* kv_start, const int64_t* tables,
            int64_t max_blocks, int64_t block_size, int64_t H, int64_t Hkv, float scale,
            int causal, const float* bias, int64_t bias_stride, int64_t bias_offset) {
  auto rows_of = [&](int64_t s) {
    return Rows{k, v, k_stride, v_stride, tables ? tables + s * max_blocks : nullptr,
                block_size, kv_start ? kv_start[s] : 0};
  };
  // each sequence's interleaved values, per key/value head: [s][kv][pairs][D]; the work
  // items (s, kv, first query) flattened, each sequence's longest first
  std::vector<int64_t> value_at, items;
  std::unique_ptr<uint32_t[]> values;
  try {  // an exception must not cross the C boundary (or an OpenMP region)
    value_at.assign(S + 1, 0);
    for (int64_t s = 0; s < S; ++s) value_at[s + 1] = value_at[s] + (kv_len[s] + kTile) / 2 * D * Hkv;
    values.reset(new uint32_t[value_at[S]]);  // all written before read
    for (int64_t s = 0; s < S; ++s)
      for (int64_t first = (q_len[s] - 1) / kLanes * kLanes; first >= 0; first -= kLanes)
        for (int64_t kv = 0; kv < Hkv; ++kv) items.insert(items.end(), {s, kv, first});
  } catch (const std::bad_alloc&) {
    return -2;
  }
  // per thread, the running state of a group's heads: allocated aligned here (a
  // std::vector honours HeadState's 64-byte alignment only with C++17's aligned new)
  const int64_t G = H / Hkv, threads = omp_get_max_threads();
  void* memory = aligned_alloc(64, sizeof(HeadState<D>) * G * threads);  // C11 (stdlib.h)
  if (memory == nullptr) return -2;
  std::unique_ptr<void, decltype(&free)> held(memory, &free);
  HeadState<D>* all_states = static_cast<HeadState<D>*>(memory);
  const int64_t num_items = static_cast<int64_t>(items.size()) / 3;
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < S * Hkv; ++task) {
      const int64_t s = task / Hkv, kv = task % Hkv;
      const int64_t per_head = (kv_len[s] + kTile) / 2 * D;
      interleave_values<D>(rows_of(s), kv_len[s], kv * D, values.get() + value_at[s] + kv * per_head);
    }
    HeadState<D>* states = all_states + omp_get_thread_num() * G;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < num_items; ++task) {
      const int64_t s = items[3 * task], kv = items[3 * task + 1], first = items[3 * task + 2];
      const int64_t n = q_len[s];
      Item item{first, static_cast<int>(std::min<int64_t>(kLanes, n - first)), q_pos[s] + first,
                causal != 0, kv_len[s], nullptr};
      const int64_t per_head = (kv_len[s] + kTile) / 2 * D;
      attend_item<D>(q + q_start[s] * q_stride, q_stride, rows_of(s),
                     values.get() + value_at[s] + kv * per_head, out + q_start[s] * H * D, H,
                     Hkv, kv, item, scale, bias, bias_stride, bias_offset, states);
    }
  }
  return 0;
}

}  // namespace

extern "C" int tgi_flash_prefill_supported() { return 1; }

// Queries q (row r at q + r * q_stride, heads dense [H][D]) of S sequences: sequence s
// has rows [q_start[s], q_start[s] + q_len[s]), the first at position q_pos[s], kv_len[s]
// keys: from the paged caches k / v [slots][Hkv][D] through tables [S][max_blocks]
// (tables non-null), or packed rows from kv_start[s] (row strides k_stride, v_stride).
// causal: query at position p sees keys [0, p]; else every key. bias (else null): a
// relative position bias per query head, bias[h * bias_stride + bias_offset + (query
// position - key position)], added to the scaled scores; it must cover the differences
// from -(kv_len - 1) to q_pos + q_len + 14. out [rows][H][D] bf16: the sequences' rows
// written (as q's), the others untouched.
// Returns 0; -1 for a head size it does not take (16, 32, 64, 80, 96, 128, 256); -2 when
// its buffers cannot be allocated.
extern "C" int tgi_flash_prefill_bf16(const uint16_t* q, int64_t q_stride, const uint16_t* k,
                                      int64_t k_stride, const uint16_t* v, int64_t v_stride,
                                      uint16_t* out, int64_t S, const int64_t* q_start,
                                      const int64_t* q_len, const int64_t* q_pos,
                                      const int64_t* kv_len,
                                      const int64_t* kv_start, const int64_t* tables,
                                      int64_t max_blocks, int64_t block_size, int64_t H,
                                      int64_t Hkv, int64_t D, float scale, int causal,
                                      const float* bias, int64_t bias_stride,
                                      int64_t bias_offset) {
#define TGI_PREFILL(HEAD)                                                                    \
  prefill<HEAD>(q, q_stride, k, k_stride, v, v_stride, out, S, q_start, q_len, q_pos, kv_len, \
                kv_start, tables, max_blocks, block_size, H, Hkv, scale, causal, bias,     \
                bias_stride, bias_offset)
  switch (D) {
    case 16: return TGI_PREFILL(16);
    case 32: return TGI_PREFILL(32);
    case 64: return TGI_PREFILL(64);
    case 80: return TGI_PREFILL(80);
    case 96: return TGI_PREFILL(96);
    case 128: return TGI_PREFILL(128);
    case 256: return TGI_PREFILL(256);
    default: return -1;
  }
#undef TGI_PREFILL
}

#else  // no AVX-512 BF16: callers keep their general path

extern "C" int tgi_flash_prefill_supported() { return 0; }
extern "C" int tgi_flash_prefill_bf16(const uint16_t*, int64_t, const uint16_t*, int64_t,
                                      const uint16_t*, int64_t, uint16_t*, int64_t,
                                      const int64_t*, const int64_t*, const int64_t*, const int64_t*,
                                      const int64_t*, const int64_t*, int64_t, int64_t, int64_t,
                                      int64_t, int64_t, float, int, const float*, int64_t,
                                      int64_t) {
  return -1;
}

#endif
