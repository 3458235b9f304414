// The ``streamed`` linear kernel of the tuned backend (engine/streamed.py builds and loads it).
//
// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for a block of a few rows m (a decode step or a
// verify block). A step of a small model is bound by streaming its weights from memory; BLAS small-M
// paths switch to compute-oriented kernels that pack or re-read the weights from 4 rows on. Here a
// task holds R weight rows in flight at once, loads each 16 (AVX-512) or 8 (AVX2) weights once and
// multiplies them against every row of the block, which stays in L1 (M x R accumulator registers),
// and prefetches the weight rows the next tile reads into L2 while it computes. A block of up to
// SLICE_ROWS rows thus costs about what one row costs; a larger block still reads the weights from
// memory once: a task multiplies a group of weight rows, held in L1 / L2, against it SLICE_ROWS rows at
// a time.
//
// Exactness: the sum of (m, n) is computed the same way whatever the number of rows in the call and
// whatever R: one vector of partial sums (k mod LANES), each lane a chain of fused multiply-adds in
// k order (the k tail as a masked / zero-padded last vector), then a fixed-order horizontal sum. A
// row's output is therefore bitwise the same in a 1-row call (an AR step) and in a k-row call
// (verification), and the weights are the module's own (no copy).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "simd.h"

#include <algorithm>
#include <array>
#include <utility>

namespace decodebench {
namespace {

#if defined(__AVX512F__)
// weight rows in flight per block size (index = rows): fills the register file
constexpr int R_FOR[MAX_ROWS + 1] = {0, 8, 8, 6, 5, 4, 4, 3, 3, 2, 2, 2, 1, 1, 1, 1, 1};
#else
constexpr int R_FOR[MAX_ROWS + 1] = {0, 6, 4, 3, 2, 2, 2, 1, 1};
#endif

// Rows [n, n + R) of the weight against the M rows of the block; prefetches `ahead` floats further on.
template <int M, int R>
inline void tile(const float* __restrict x, const float* __restrict w, float* __restrict y, int64_t K, int64_t N,
                 int64_t n, int64_t ahead) {
  Vec acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = zero();
  const int64_t k_vec = K / LANES * LANES;
  for (int64_t k = 0; k < k_vec; k += LANES) {
    Vec wr[R];
    for (int r = 0; r < R; ++r) {
      wr[r] = load(w + (n + r) * K + k);
      _mm_prefetch(reinterpret_cast<const char*>(w + (n + r) * K + k + ahead), _MM_HINT_T1);
    }
    for (int m = 0; m < M; ++m) {
      const Vec xm = load(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = fma(wr[r], xm, acc[r][m]);
    }
  }
  if (k_vec < K) {
    const int tail = static_cast<int>(K - k_vec);
    for (int m = 0; m < M; ++m) {
      const Vec xm = load_tail(x + m * K + k_vec, tail);
      for (int r = 0; r < R; ++r) acc[r][m] = fma(load_tail(w + (n + r) * K + k_vec, tail), xm, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) y[m * N + n + r] = hsum(acc[r][m]);
}

// Weight rows [n0, n1) against the M rows of the block (R at a time, the rest one by one), prefetching
// `ahead` floats further on
template <int M>
void group(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1, int64_t ahead) {
  constexpr int R = R_FOR[M];
  int64_t n = n0;
  for (; n + R <= n1; n += R) tile<M, R>(x, w, y, K, N, n, ahead);
  for (; n < n1; ++n) tile<M, 1>(x, w, y, K, N, n, 0);
}

using Group = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t);

template <int... M>
constexpr auto groups(std::integer_sequence<int, M...>) {
  return std::array<Group, sizeof...(M)>{(M == 0 ? nullptr : &group<(M == 0 ? 1 : M)>)...};
}
const auto GROUPS = groups(std::make_integer_sequence<int, MAX_ROWS + 1>{});

// weight rows per task of a block larger than SLICE_ROWS: 16 · K floats stay in L1 / L2 while every
// SLICE_ROWS-row slice of the block is multiplied against them
constexpr int64_t GROUP_ROWS = 16;
// rows of one register pass: up to here one tile holds the whole block, beyond it slices
constexpr int64_t SLICE_ROWS = MAX_ROWS / 2;

}  // namespace

void streamed_rows(const float* x, int64_t rows, const float* w, int64_t K, int64_t N, float* y) {
  if (rows <= SLICE_ROWS) {  // one register pass: tiles of R weight rows split among the threads
    const int64_t R = R_FOR[rows], tiles = std::max<int64_t>(N / R, 1);
    const int64_t ahead = std::max<int64_t>(R, 4) * K;  // the next few weight rows, into L2
    at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
      GROUPS[rows](x, w, y, K, N, begin * R, end == tiles ? N : end * R, ahead);  // the last takes the N tail
    });
    return;
  }
  // more rows than one pass keeps cheap: still one pass over the weights from memory, each group of
  // weight rows taking the block SLICE_ROWS rows at a time (the same tiles, so the same sums), and
  // prefetching the next group's rows, so every slice keeps the stream going. Past SLICE_ROWS rows a
  // register tile holds too few weight rows: every loaded input vector would feed one or two
  // multiply-adds, and the loads, not the arithmetic, would set the pace.
  at::parallel_for(0, (N + GROUP_ROWS - 1) / GROUP_ROWS, 4, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n0 = g * GROUP_ROWS, n1 = std::min(N, n0 + GROUP_ROWS);
      for (int64_t start = 0; start < rows; start += SLICE_ROWS) {
        const int64_t count = std::min<int64_t>(SLICE_ROWS, rows - start);
        GROUPS[count](x + start * K, w, y + start * N, K, N, n0, n1, GROUP_ROWS * K);
      }
    }
  });
}

}  // namespace decodebench

torch::Tensor streamed_linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat, "streamed_linear: fp32 only");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "streamed_linear: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "streamed_linear: weight must be a contiguous (out, in) matrix");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(-1) == K, "streamed_linear: input has ", x.size(-1), " features, weight ", K);
  const auto flat = x.reshape({-1, K}).contiguous();
  const int64_t rows = flat.size(0);
  auto out = torch::empty({rows, N}, x.options());
  decodebench::streamed_rows(flat.data_ptr<float>(), rows, weight.data_ptr<float>(), K, N, out.data_ptr<float>());
  if (bias.has_value() && bias->defined()) out.add_(*bias);
  auto shape = x.sizes().vec();
  shape.back() = N;
  return out.view(shape);
}

// torch.ops.decodebench.streamed_linear: an operator (seen by the profiler and by torch.compile, which
// gets its shape function from engine/streamed.py); the Python module only makes the library loadable
TORCH_LIBRARY(decodebench, m) { m.def("streamed_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor"); }
TORCH_LIBRARY_IMPL(decodebench, CPU, m) { m.impl("streamed_linear", &streamed_linear); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
