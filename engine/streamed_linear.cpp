// The ``streamed`` linear kernel of the tuned backend (engine/streamed.py builds and loads it).
//
// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for a block of a few rows m (a decode step or a
// verify block): each weight row is read from memory once and multiplied against every row of the
// block, which stays in L1/L2, so the cost of a block is the cost of streaming the weights, nearly
// flat in the number of rows (BLAS small-M paths switch kernels and re-read weights instead).
//
// Exactness: the sum of (m, n) is computed the same way whatever the number of rows in the call:
// LANES partial sums (k mod LANES), each a chain of fused multiply-adds in k order, added lane 0 to
// LANES - 1, then the k tail as further fused multiply-adds. A row's output is therefore bitwise the
// same in a 1-row call (an AR step) and in a k-row call (verification), and the weights are the
// module's own (no copy).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace {

constexpr int LANES = 16;
constexpr int MAX_ROWS = 16;    // rows per pass over the weights (larger blocks take several passes)
constexpr int64_t GRAIN = 64;   // weight rows per parallel task

// M block rows against weight rows [n0, n1), R weight rows at a time (R * M accumulators of LANES).
template <int M, int R>
void block(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t k_vec = K / LANES * LANES;
  for (int64_t n = n0; n < n1; n += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, n1 - n));
    float acc[R][M][LANES] = {};
    if (rows == R) {
      for (int64_t k = 0; k < k_vec; k += LANES)
        for (int r = 0; r < R; ++r) {
          const float* wr = w + (n + r) * K + k;
          for (int m = 0; m < M; ++m) {
            const float* xm = x + m * K + k;
            for (int v = 0; v < LANES; ++v) acc[r][m][v] = std::fma(wr[v], xm[v], acc[r][m][v]);
          }
        }
    } else {
      for (int r = 0; r < rows; ++r)
        for (int64_t k = 0; k < k_vec; k += LANES) {
          const float* wr = w + (n + r) * K + k;
          for (int m = 0; m < M; ++m) {
            const float* xm = x + m * K + k;
            for (int v = 0; v < LANES; ++v) acc[r][m][v] = std::fma(wr[v], xm[v], acc[r][m][v]);
          }
        }
    }
    for (int r = 0; r < rows; ++r) {
      const float* wr = w + (n + r) * K;
      for (int m = 0; m < M; ++m) {
        float sum = 0.f;
        for (int v = 0; v < LANES; ++v) sum += acc[r][m][v];
        const float* xm = x + m * K;
        for (int64_t k = k_vec; k < K; ++k) sum = std::fma(wr[k], xm[k], sum);
        y[m * N + n + r] = sum;
      }
    }
  }
}

template <int M, int R>
void pass(const float* x, const float* w, float* y, int64_t K, int64_t N) {
  at::parallel_for(0, (N + GRAIN - 1) / GRAIN, 1, [&](int64_t begin, int64_t end) {
    block<M, R>(x, w, y, K, N, begin * GRAIN, std::min(N, end * GRAIN));
  });
}

using Pass = void (*)(const float*, const float*, float*, int64_t, int64_t);
// by row count: about 16 accumulator vectors per task (registers, not memory)
const Pass PASSES[MAX_ROWS + 1] = {
    nullptr,      pass<1, 8>,   pass<2, 8>,   pass<3, 4>,   pass<4, 4>,   pass<5, 2>,
    pass<6, 2>,   pass<7, 2>,   pass<8, 2>,   pass<9, 1>,   pass<10, 1>,  pass<11, 1>,
    pass<12, 1>,  pass<13, 1>,  pass<14, 1>,  pass<15, 1>,  pass<16, 1>,
};

}  // namespace

torch::Tensor streamed_linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat, "streamed_linear: fp32 only");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "streamed_linear: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "streamed_linear: weight must be a contiguous (out, in) matrix");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(-1) == K, "streamed_linear: input has ", x.size(-1), " features, weight ", K);
  const auto flat = x.reshape({-1, K}).contiguous();
  const int64_t rows = flat.size(0);
  auto out = torch::empty({rows, N}, x.options());
  const float* wp = weight.data_ptr<float>();
  for (int64_t start = 0; start < rows; start += MAX_ROWS) {
    const int64_t count = std::min<int64_t>(MAX_ROWS, rows - start);
    PASSES[count](flat.data_ptr<float>() + start * K, wp, out.data_ptr<float>() + start * N, K, N);
  }
  if (bias.has_value() && bias->defined()) out.add_(*bias);
  auto shape = x.sizes().vec();
  shape.back() = N;
  return out.view(shape);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("streamed_linear", &streamed_linear, "few-row fp32 linear streaming each weight row once");
}
