// The greedy choice and the log-normalizer of each row of a step's float32 logits, in
// two passes over the row (the second from cache), without the temporaries that
// torch's max + logsumexp allocate (a 64 x 49152 step: ~5 ms -> under 1 ms).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "exp_nonpositive.h"

// For each row r of x (cols floats, rows row_stride floats apart): argmax[r], the first
// index of its maximum, and lse[r] = log(sum(exp(x - max))) + max. A row holding NaN
// gets lse NaN (the caller falls back to torch for torch's NaN semantics).
extern "C" void tgi_greedy_logsumexp(const float* x, int64_t rows, int64_t cols,
                                     int64_t row_stride, int64_t* argmax, float* lse) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * row_stride;
    float top = -INFINITY;
    bool nan = false;
#pragma omp simd reduction(max : top) reduction(|| : nan)
    for (int64_t i = 0; i < cols; ++i) {
      top = std::max(top, row[i]);
      nan = nan || row[i] != row[i];
    }
    int64_t index = 0;
    while (index < cols && row[index] != top) ++index;
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < cols; ++i) total += exp_nonpositive(row[i] - top);
    argmax[r] = index < cols ? index : 0;
    lse[r] = nan ? NAN : top + std::log(total);
  }
}
