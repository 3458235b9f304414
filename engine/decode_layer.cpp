// One fused pre-norm SwiGLU decoder layer for a small block (a decode step or a verify block, of one
// sequence or of a batch of rows, each at its own cache length `starts[b]`) in a single operator call: torch.ops.decodebench.decode_layer (engine/fused_layers.py calls it; built
// with streamed_linear.cpp by engine/streamed.py). A batch's blocks are padded to a common width; only
// each row's `sizes[b]` real tokens run (packed into one run of rows), so a verify costs the rows the
// drafts hold, not batch × the longest draft.
//
// A step of a small model spends ~30 % of its time outside the matmuls in the Python layer: ~25 small
// torch ops per layer (norms, RoPE, cache writes, attention, SiLU, residuals), each paying dispatch
// and, for the parallel ones, a thread-pool wake-up. Here a layer is
//   x̂ = RMSNorm(x) · g₁;  q, k, v = x̂ W_qkvᵀ (+ b);  RoPE(q, k) from the step's cos / sin;
//   K/V written into row b's cache at [starts[b], starts[b] + q);  a = softmax(q kᵀ · scaling + mask) v (GQA);
//   x' = x + a W_oᵀ;  x̂' = RMSNorm(x') · g₂;  x'' = x' + (SiLU(x̂' W_gateᵀ) ⊙ x̂' W_upᵀ) W_downᵀ
// with the four matmuls on the streamed kernel (streamed_rows, parallel over weight rows) and the
// glue as plain loops on the block's few rows; attention runs in parallel over (batch row, head, 4 of
// the block's queries), each task taking its queries key tile by key tile.
//
// Arithmetic: the same fp32 operations as the Python layer (RoPE as x·cos + rotate_half(x)·sin with
// separate products; RMSNorm x·rsqrt(mean(x²) + eps)·g; SiLU x / (1 + e^(−x)); the exponentials of SiLU and the
// softmax vectorised, simd.h exp_lanes, within 2 ulp). Reductions (the
// RMSNorm mean, attention dot products, softmax sums and the weighted sum of the values, as fused
// multiply-adds) are in this file's fixed order, so a row's
// result does not depend on the other rows of its block: AR steps and verify blocks agree bitwise.
// The backend's exactness probe compares the logits with the HF layers' on every apply.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace decodebench {
namespace {

// sum_k a[k] * b[k], lane-wise FMAs in k order then a fixed-order horizontal sum
inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc = zero();
  const int64_t n_vec = n / LANES * LANES;
  for (int64_t k = 0; k < n_vec; k += LANES) acc = fma(load(a + k), load(b + k), acc);
  if (n_vec < n) acc = fma(load_tail(a + n_vec, static_cast<int>(n - n_vec)), load_tail(b + n_vec, static_cast<int>(n - n_vec)), acc);
  return hsum(acc);
}

void rms_norm(const float* x, const float* gain, float eps, int64_t rows, int64_t H, float* out) {
  for (int64_t m = 0; m < rows; ++m) {
    const float* row = x + m * H;
    const float inv = 1.0f / std::sqrt(dot(row, row, H) / static_cast<float>(H) + eps);
    for (int64_t h = 0; h < H; ++h) out[m * H + h] = gain[h] * (row[h] * inv);
  }
}

void add_bias(float* y, const c10::optional<torch::Tensor>& bias, int64_t rows, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return;
  const float* b = bias->data_ptr<float>();
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t n = 0; n < N; ++n) y[m * N + n] += b[n];
}

// x · cos + rotate_half(x) · sin for one head of one row (d = head_dim, rotate_half(x) = [−x₂, x₁])
void rope(float* x, const float* cos, const float* sin, int64_t d) {
  const int64_t half = d / 2;
  float rotated[1024];
  for (int64_t j = 0; j < half; ++j) rotated[j] = -x[j + half];
  for (int64_t j = half; j < d; ++j) rotated[j] = x[j - half];
  for (int64_t j = 0; j < d; ++j) x[j] = x[j] * cos[j] + rotated[j] * sin[j];
}

// act[i] = SiLU(gate[i]) · up[i] = gate[i] / (1 + e^(−gate[i])) · up[i] for one row ([gate | up], I each),
// the exponential vectorised (exp_lanes); the I tail through a zero-padded vector
void silu_times(const float* gate_up, int64_t I, float* act) {
  const auto one = [](Vec g, Vec u) { return mul(div(g, add(broadcast(1.0f), exp_lanes(sub(zero(), g)))), u); };
  const int64_t i_vec = I / LANES * LANES;
  for (int64_t i = 0; i < i_vec; i += LANES) store(act + i, one(load(gate_up + i), load(gate_up + I + i)));
  if (i_vec < I) {
    alignas(64) float g[LANES] = {}, u[LANES] = {}, out[LANES];
    std::copy(gate_up + i_vec, gate_up + I, g);
    std::copy(gate_up + I + i_vec, gate_up + 2 * I, u);
    store(out, one(load(g), load(u)));
    std::copy_n(out, I - i_vec, act + i_vec);
  }
}

// Up to QUERIES_PER_TASK queries of one head of one batch row against that row's cache. Work goes key
// tile by key tile (4 · LANES keys, L1-resident) over every query, so a key or value vector is read
// from L2 once per task instead of once per query, and LANES scores come out of one butterfly
// (hsum_lanes) instead of LANES horizontal sums.
constexpr int64_t QUERIES_PER_TASK = 4;  // a task's queries: enough tasks to balance the threads

struct HeadBlock {
  const float* queries;  // query m at queries + m * query_stride
  int64_t query_stride;
  const float* keys;     // (capacity, d) rows of the head's kv head
  const float* values;   // idem
  const bool* visible;   // query m's mask over the L keys at visible + m * mask_stride, or nullptr: keys 0..start + m
  int64_t mask_stride, start, q, L, d;
  float scale;
  float* dest;  // query m's output at dest + m * dest_stride
  int64_t dest_stride;
};

// score[j] = dot(query, keys_j) for j < L: LANES keys at a time (lane i = dot's value for key
// j0 + i, bitwise: the same fused multiply-adds in k order and hsum's tree), the tail one by one
void scores(const float* query, const float* keys, int64_t L, int64_t d, float* score) {
  const int64_t l_vec = d % LANES == 0 ? L / LANES * LANES : 0;
  for (int64_t j0 = 0; j0 < l_vec; j0 += LANES) {
    Vec acc[LANES];
    for (int i = 0; i < LANES; ++i) acc[i] = zero();
    for (int64_t k = 0; k < d; k += LANES) {
      const Vec x = load(query + k);
      for (int i = 0; i < LANES; ++i) acc[i] = fma(x, load(keys + (j0 + i) * d + k), acc[i]);
    }
    store(score + j0, hsum_lanes(acc));
  }
  for (int64_t j = l_vec; j < L; ++j) score[j] = dot(query, keys + j * d, d);
}

// Scaled scores (masked keys −inf) → unnormalised softmax weights in place; returns their sum, taken
// lane-wise (j mod LANES) and then with hsum: a fixed order for a given L, whatever the block
float softmax_weights(float* weights, const bool* visible, int64_t last, int64_t L, float scale) {
  const float hidden = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < L; ++j) weights[j] = (visible ? visible[j] : j <= last) ? weights[j] * scale : hidden;
  const int64_t l_vec = L / LANES * LANES;
  alignas(64) float tail[LANES];  // the L tail through a padded vector (padding −inf: weight 0, never stored)
  std::fill_n(tail, LANES, hidden);
  std::copy(weights + l_vec, weights + L, tail);
  Vec best = load(tail);
  for (int64_t j = 0; j < l_vec; j += LANES) best = max(best, load(weights + j));
  const Vec shift = broadcast(hmax(best));  // exact whatever the order
  Vec total = zero();
  for (int64_t j = 0; j < l_vec; j += LANES) {
    const Vec e = exp_lanes(sub(load(weights + j), shift));
    store(weights + j, e);
    total = add(total, e);
  }
  if (l_vec < L) {
    const Vec e = exp_lanes(sub(load(tail), shift));
    store(tail, e);
    std::copy_n(tail, L - l_vec, weights + l_vec);
    total = add(total, e);
  }
  return hsum(total);
}

// dest[m] += Σ_{j in [j0, j1)} weights[m][j] · v_j for the G queries from m0: per lane a chain of
// fused multiply-adds in j order, skipping zero weights (masked keys), so a query's sum does not
// depend on the tiling or on the queries beside it; the G output rows in registers (d = V · LANES)
// and each value vector loaded once for all of them
template <int V, int G>
void accumulate_values(const HeadBlock& a, const float* weights, int64_t m0, int64_t j0, int64_t j1) {
  Vec out[G][V];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < V; ++c) out[g][c] = load(a.dest + (m0 + g) * a.dest_stride + c * LANES);
  for (int64_t j = j0; j < j1; ++j) {
    const float* v = a.values + j * a.d;
    Vec value[V];
    for (int c = 0; c < V; ++c) value[c] = load(v + c * LANES);
    for (int g = 0; g < G; ++g) {
      const float w = weights[(m0 + g) * a.L + j];
      const Vec wj = broadcast(w);
      for (int c = 0; c < V; ++c) out[g][c] = fma_if(w != 0.0f, wj, value[c], out[g][c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < V; ++c) store(a.dest + (m0 + g) * a.dest_stride + c * LANES, out[g][c]);
}

// as many queries per pass as the registers hold beside one value row (at most 4)
template <int V>
constexpr int GROUP = std::max(1, std::min(4, (REGISTERS - V - 2) / V));

template <int V>
void accumulate_all(const HeadBlock& a, const float* weights, int64_t j0, int64_t j1) {
  constexpr int G = GROUP<V>;
  int64_t m = 0;
  for (; m + G <= a.q; m += G) accumulate_values<V, G>(a, weights, m, j0, j1);
  for (; m < a.q; ++m) accumulate_values<V, 1>(a, weights, m, j0, j1);
}

void accumulate_values_any(const HeadBlock& a, const float* weights, int64_t j0, int64_t j1) {
  const int64_t d_vec = a.d / LANES * LANES;
  for (int64_t m = 0; m < a.q; ++m) {
    const float* w = weights + m * a.L;
    float* dest = a.dest + m * a.dest_stride;
    for (int64_t j = j0; j < j1; ++j) {
      if (w[j] == 0.0f) continue;
      const float* v = a.values + j * a.d;
      const Vec wj = broadcast(w[j]);
      for (int64_t c = 0; c < d_vec; c += LANES) store(dest + c, fma(wj, load(v + c), load(dest + c)));
      for (int64_t c = d_vec; c < a.d; ++c) dest[c] = std::fma(w[j], v[c], dest[c]);
    }
  }
}

// softmax(q kᵀ · scale + mask) v for the block's q queries of one head; `weights` holds q · L floats
void attend_block(const HeadBlock& a, float* weights) {
  constexpr int64_t TILE = 4 * LANES;  // keys per tile: TILE · d floats of K or V stay in L1
  for (int64_t j0 = 0; j0 < a.L; j0 += TILE) {
    const int64_t n = std::min(TILE, a.L - j0);
    for (int64_t m = 0; m < a.q; ++m)
      scores(a.queries + m * a.query_stride, a.keys + j0 * a.d, n, a.d, weights + m * a.L + j0);
  }
  float totals[QUERIES_PER_TASK];
  for (int64_t m = 0; m < a.q; ++m) {
    totals[m] = softmax_weights(weights + m * a.L, a.visible ? a.visible + m * a.mask_stride : nullptr,
                                a.start + m, a.L, a.scale);
    std::fill_n(a.dest + m * a.dest_stride, a.d, 0.0f);
  }
  const int vectors = a.d == LANES * 2 ? 2 : a.d == LANES * 4 ? 4 : a.d == LANES * 8 ? 8 : 0;
  for (int64_t j0 = 0; j0 < a.L; j0 += TILE) {
    const int64_t j1 = std::min(j0 + TILE, a.L);
    switch (vectors) {
      case 2: accumulate_all<2>(a, weights, j0, j1); break;
      case 4: accumulate_all<4>(a, weights, j0, j1); break;
      case 8: accumulate_all<8>(a, weights, j0, j1); break;
      default: accumulate_values_any(a, weights, j0, j1);
    }
  }
  for (int64_t m = 0; m < a.q; ++m)
    for (int64_t c = 0; c < a.d; ++c) a.dest[m * a.dest_stride + c] /= totals[m];
}

}  // namespace
}  // namespace decodebench

torch::Tensor decode_layer(const torch::Tensor& hidden, const torch::Tensor& attention_norm,
                           const torch::Tensor& qkv_weight, const c10::optional<torch::Tensor>& qkv_bias,
                           const torch::Tensor& o_weight, const c10::optional<torch::Tensor>& o_bias,
                           const torch::Tensor& mlp_norm, const torch::Tensor& gate_up_weight,
                           const c10::optional<torch::Tensor>& gate_up_bias, const torch::Tensor& down_weight,
                           const c10::optional<torch::Tensor>& down_bias, const torch::Tensor& cos,
                           const torch::Tensor& sin, torch::Tensor& key_cache, torch::Tensor& value_cache,
                           c10::IntArrayRef starts, c10::IntArrayRef sizes, const c10::optional<torch::Tensor>& mask, int64_t heads,
                           int64_t kv_heads, double eps, double scaling) {
  using namespace decodebench;
  TORCH_CHECK(hidden.scalar_type() == torch::kFloat && hidden.is_contiguous() && hidden.dim() == 3,
              "decode_layer: hidden must be a contiguous fp32 (batch, q, hidden) tensor");
  const int64_t batch = hidden.size(0), q = hidden.size(1), H = hidden.size(2), rows = batch * q;
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous() && key_cache.size(0) == batch &&
                  static_cast<int64_t>(starts.size()) == batch,
              "decode_layer: the K/V caches must be contiguous (batch, kv_heads, capacity, head_dim) tensors "
              "with one start per row");
  const int64_t d = key_cache.size(3), capacity = key_cache.size(2);
  const int64_t L = *std::max_element(starts.begin(), starts.end()) + q;  // key slots of the block's mask
  const int64_t qkv_width = (heads + 2 * kv_heads) * d, I = gate_up_weight.size(0) / 2, groups = heads / kv_heads;
  TORCH_CHECK(qkv_weight.size(0) == qkv_width && key_cache.size(1) == kv_heads && L <= capacity && d <= 1024,
              "decode_layer: shapes disagree (qkv ", qkv_weight.size(0), " vs ", qkv_width, ", cache ", key_cache.sizes(),
              ", block ends at ", L, ")");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == rows * d && sin.numel() == rows * d,
              "decode_layer: cos / sin must be contiguous (batch * q, head_dim)");
  const bool* visible = nullptr;
  torch::Tensor mask_rows;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == torch::kBool && mask->numel() == rows * L,
                "decode_layer: mask must be bool (batch, q, max(starts) + q)");
    mask_rows = mask->reshape({rows, L}).contiguous();
    visible = mask_rows.data_ptr<bool>();
  } else {
    TORCH_CHECK(batch == 1, "decode_layer: a batch needs its mask (rows sit at their own lengths)");
  }

  // only the blocks' real rows run (row b's first sizes[b] tokens; the rest is padding): packed in
  // order, packed row first[b] + m is block row b · q + m
  TORCH_CHECK(static_cast<int64_t>(sizes.size()) == batch, "decode_layer: one size per row");
  std::vector<int64_t> first(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(sizes[b] >= 1 && sizes[b] <= q, "decode_layer: row ", b, " has ", sizes[b], " real tokens of ", q);
    first[b + 1] = first[b] + sizes[b];
  }
  const int64_t n = first[batch];
  const bool padded = n < rows;
  std::vector<float> packed_in, packed_out;
  const float* x = hidden.data_ptr<float>();
  if (padded) {
    packed_in.resize(n * H);
    for (int64_t b = 0; b < batch; ++b) std::copy_n(x + b * q * H, sizes[b] * H, packed_in.data() + first[b] * H);
    x = packed_in.data();
  }
  std::vector<float> normed(n * H), qkv(n * qkv_width), attended(n * heads * d), residual(n * H);
  std::vector<float> gate_up(n * 2 * I), act(n * I);
  auto out = torch::empty_like(hidden);
  if (padded) packed_out.resize(n * H);
  float* y = padded ? packed_out.data() : out.data_ptr<float>();

  // attention half (the linears over every real row of the batch at once)
  rms_norm(x, attention_norm.data_ptr<float>(), static_cast<float>(eps), n, H, normed.data());
  streamed_rows(normed.data(), n, qkv_weight.data_ptr<float>(), H, qkv_width, qkv.data());
  add_bias(qkv.data(), qkv_bias, n, qkv_width);
  const float* cos_p = cos.data_ptr<float>();
  const float* sin_p = sin.data_ptr<float>();
  const int64_t cache_row = kv_heads * capacity * d;  // one batch row of a K or V buffer
  for (int64_t b = 0; b < batch; ++b) {
    float* keys = key_cache.data_ptr<float>() + b * cache_row;
    float* values = value_cache.data_ptr<float>() + b * cache_row;
    for (int64_t m = 0; m < sizes[b]; ++m) {
      const int64_t r = b * q + m;  // block row (cos / sin, mask)
      float* row = qkv.data() + (first[b] + m) * qkv_width;
      for (int64_t h = 0; h < heads + kv_heads; ++h) rope(row + h * d, cos_p + r * d, sin_p + r * d, d);
      for (int64_t h = 0; h < kv_heads; ++h) {
        std::copy_n(row + (heads + h) * d, d, keys + (h * capacity + starts[b] + m) * d);
        std::copy_n(row + (heads + kv_heads + h) * d, d, values + (h * capacity + starts[b] + m) * d);
      }
    }
  }
  const float scale = static_cast<float>(scaling);
  const int64_t chunks = (q + QUERIES_PER_TASK - 1) / QUERIES_PER_TASK;
  at::parallel_for(0, batch * heads * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(QUERIES_PER_TASK * L);
    for (int64_t task = begin; task < end; ++task) {
      // a row sees only its own entries (slots < its start + its size): the same keys, in the same order,
      // as when it decodes alone, so its result does not depend on the batch or on the block's other queries
      const int64_t b = task / (heads * chunks), h = task / chunks % heads, kv = h / groups;
      const int64_t m0 = task % chunks * QUERIES_PER_TASK, count = std::min(QUERIES_PER_TASK, sizes[b] - m0);
      if (count <= 0) continue;  // padding queries
      const HeadBlock block{qkv.data() + (first[b] + m0) * qkv_width + h * d,
                            qkv_width,
                            key_cache.data_ptr<float>() + b * cache_row + kv * capacity * d,
                            value_cache.data_ptr<float>() + b * cache_row + kv * capacity * d,
                            visible ? visible + (b * q + m0) * L : nullptr,
                            L,
                            starts[b] + m0,
                            count,
                            starts[b] + sizes[b],
                            d,
                            scale,
                            attended.data() + (first[b] + m0) * heads * d + h * d,
                            heads * d};
      attend_block(block, weights.data());
    }
  });
  streamed_rows(attended.data(), n, o_weight.data_ptr<float>(), heads * d, H, residual.data());
  add_bias(residual.data(), o_bias, n, H);
  for (int64_t i = 0; i < n * H; ++i) residual[i] = x[i] + residual[i];

  // MLP half
  rms_norm(residual.data(), mlp_norm.data_ptr<float>(), static_cast<float>(eps), n, H, normed.data());
  streamed_rows(normed.data(), n, gate_up_weight.data_ptr<float>(), H, 2 * I, gate_up.data());
  add_bias(gate_up.data(), gate_up_bias, n, 2 * I);
  for (int64_t r = 0; r < n; ++r) silu_times(gate_up.data() + r * 2 * I, I, act.data() + r * I);
  streamed_rows(act.data(), n, down_weight.data_ptr<float>(), I, H, y);
  add_bias(y, down_bias, n, H);
  for (int64_t i = 0; i < n * H; ++i) y[i] = residual[i] + y[i];
  if (padded) {  // real rows back in place; a padding row passes its input through (never read)
    float* o = out.data_ptr<float>();
    std::copy_n(hidden.data_ptr<float>(), rows * H, o);
    for (int64_t b = 0; b < batch; ++b) std::copy_n(y + first[b] * H, sizes[b] * H, o + b * q * H);
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(decodebench, m) {
  m.def(
      "decode_layer(Tensor hidden, Tensor attention_norm, Tensor qkv_weight, Tensor? qkv_bias, Tensor o_weight, "
      "Tensor? o_bias, Tensor mlp_norm, Tensor gate_up_weight, Tensor? gate_up_bias, Tensor down_weight, "
      "Tensor? down_bias, Tensor cos, Tensor sin, Tensor(a!) key_cache, Tensor(b!) value_cache, int[] starts, "
      "int[] sizes, Tensor? mask, int heads, int kv_heads, float eps, float scaling) -> Tensor");
}
TORCH_LIBRARY_IMPL(decodebench, CPU, m) { m.impl("decode_layer", &decode_layer); }
