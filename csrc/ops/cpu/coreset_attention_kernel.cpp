// CPU implementation of coreset_attention (ALGORITHM.md §3).
//
// Each task owns a block of queries of one query head and reads the coreset of its kv head
// (h / (Hq / Hkv): grouped-query attention by index arithmetic, no copies of the coreset).
// Per tile of queries: logits by axpys over the slots (keys transposed), their maximum, then the
// weighted sums; the logits live in a small buffer. Output is written in the accumulation dtype
// of the op (float32, float64 for float64) and cast to the query's dtype at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../../kernels/common.h"
#include "../checks.h"

namespace wildcat {
namespace cpu {
namespace {

// Query rows per parallel task: large enough to amortise scheduling, small enough to balance.
constexpr int64_t kQueryBlock = 64;
constexpr double kDenominatorFloor = 1e-20;

template <typename T>
struct AttentionArgs {
  const T* query;      // (batch, Hq, M, E)
  const T* keys_t;     // (batch, Hkv, E, r): transposed, so logits are axpys over the slots
  const T* values;     // (batch, Hkv, r, D)
  const T* weights;    // (batch, Hkv, r)
  const T* value_min;  // (batch, Hkv, D) or null
  const T* value_max;
  bool center_values;
  double beta;
  int64_t batch, q_heads, kv_heads, m, r, e, dv;
};

// Queries processed together, so that every key and value loaded feeds kTile multiply-adds.
constexpr int64_t kTile = 4;

// Logits and sums accumulate in double whatever the input: products of float32 values are exact
// there, and float32 accumulation measured as large an error as the plain-PyTorch oracle's, with
// its tail at more than twice (benchmarks/NOTES.md); double costs about 1.6x here, on the
// cheaper of the two phases.
template <typename T>
void attend_block(const AttentionArgs<T>& a, int64_t bh, int64_t m_begin, int64_t m_end, T* out,
                  std::vector<double>& logits, std::vector<double>& numerator) {
  const int64_t b = bh / a.q_heads, h = bh % a.q_heads;
  const int64_t kvh = b * a.kv_heads + h / (a.q_heads / a.kv_heads);
  const int64_t r = a.r, dv = a.dv, e = a.e;
  const T* keys_t = a.keys_t + kvh * e * r;
  const T* values = a.values + kvh * r * dv;
  const T* weights = a.weights + kvh * r;
  const T* vmin = a.value_min ? a.value_min + kvh * dv : nullptr;
  const T* vmax = a.value_max ? a.value_max + kvh * dv : nullptr;
  logits.resize(kTile * r);
  numerator.resize(kTile * dv);
  double* z = logits.data();
  double* num = numerator.data();
  for (int64_t i0 = m_begin; i0 < m_end; i0 += kTile) {
    const int64_t tile = std::min(kTile, m_end - i0);
    const T* q = a.query + (bh * a.m + i0) * e;
    std::fill(z, z + kTile * r, 0.0);
    for (int64_t c = 0; c < e; ++c) {  // z[t] = K q_t
      double qc[kTile];
      for (int64_t t = 0; t < kTile; ++t) qc[t] = t < tile ? static_cast<double>(q[t * e + c]) : 0.0;
      const T* kc = keys_t + c * r;
#pragma omp simd
      for (int64_t s = 0; s < r; ++s) {
        for (int64_t t = 0; t < kTile; ++t) z[t * r + s] += qc[t] * static_cast<double>(kc[s]);
      }
    }
    double denominator[kTile];
    for (int64_t t = 0; t < kTile; ++t) {  // P = exp(β z - max β z), denominator Σ P w
      double* zt = z + t * r;
      double z_max = -std::numeric_limits<double>::infinity();
#pragma omp simd reduction(max : z_max)
      for (int64_t s = 0; s < r; ++s) z_max = std::max(z_max, zt[s]);
      double den = 0;
      for (int64_t s = 0; s < r; ++s) {
        zt[s] = std::exp(a.beta * (zt[s] - z_max));
        den += zt[s] * static_cast<double>(weights[s]);
      }
      denominator[t] = den;
    }
    std::fill(num, num + kTile * dv, 0.0);
    for (int64_t s = 0; s < r; ++s) {  // numerator Σ P V̂
      double p[kTile];
      for (int64_t t = 0; t < kTile; ++t) p[t] = z[t * r + s];
      const T* v = values + s * dv;
#pragma omp simd
      for (int64_t c = 0; c < dv; ++c) {
        for (int64_t t = 0; t < kTile; ++t) num[t * dv + c] += p[t] * static_cast<double>(v[c]);
      }
    }
    for (int64_t t = 0; t < tile; ++t) {
      T* o = out + (bh * a.m + i0 + t) * dv;
      const bool positive = denominator[t] > kDenominatorFloor;
      for (int64_t c = 0; c < dv; ++c) {
        double y = positive ? num[t * dv + c] / denominator[t] : 0.0;
        if (a.center_values) y += (static_cast<double>(vmin[c]) + vmax[c]) / 2;
        if (vmin) y = std::max(y, static_cast<double>(vmin[c]));
        if (vmax) y = std::min(y, static_cast<double>(vmax[c]));
        o[c] = static_cast<T>(y);
      }
    }
  }
}

at::Tensor coreset_attention_cpu(const at::Tensor& query, const at::Tensor& core_keys,
                                 const at::Tensor& core_values, const at::Tensor& core_weights,
                                 std::optional<double> scale, const std::optional<at::Tensor>& value_min,
                                 const std::optional<at::Tensor>& value_max, bool center_values) {
  detail::check_coreset_attention_args(query, core_keys, core_values, core_weights, scale, value_min,
                                       value_max, center_values);
  at::AutoDispatchBelowADInplaceOrView guard;  // internal ATen calls are not differentiated
  const int64_t d = query.dim();
  const int64_t m = query.size(-2), e = query.size(-1), r = core_keys.size(-2), dv = core_values.size(-1);
  const int64_t q_heads = d >= 3 ? query.size(-3) : 1;
  const int64_t kv_heads = d >= 3 ? core_keys.size(-3) : 1;
  const int64_t batch = d >= 3 ? c10::multiply_integers(query.sizes().slice(0, d - 3)) : 1;
  const auto acc = detail::accumulate_type(query.scalar_type());

  std::vector<int64_t> out_shape(query.sizes().begin(), query.sizes().end());
  out_shape.back() = dv;
  if (query.numel() == 0) return at::zeros(out_shape, query.options());

  const at::Tensor q = query.to(acc).contiguous();
  const at::Tensor k = core_keys.to(acc).transpose(-1, -2).contiguous();
  const at::Tensor v = core_values.to(acc).contiguous();
  const at::Tensor w = core_weights.to(acc).contiguous();
  std::optional<at::Tensor> lo, hi;
  if (value_min) lo = value_min->to(acc).contiguous();
  if (value_max) hi = value_max->to(acc).contiguous();
  at::Tensor out = at::empty({batch * q_heads * m * dv}, query.options().dtype(acc));

  AT_DISPATCH_FLOATING_TYPES(acc, "wildcat_coreset_attention_cpu", [&] {
    const AttentionArgs<scalar_t> args{q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                       v.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                       lo ? lo->const_data_ptr<scalar_t>() : nullptr,
                                       hi ? hi->const_data_ptr<scalar_t>() : nullptr, center_values,
                                       detail::resolve_scale(scale, e),
                                       batch, q_heads, kv_heads, m, r, e, dv};
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t blocks_per_head = (m + kQueryBlock - 1) / kQueryBlock;
    at::parallel_for(0, batch * q_heads * blocks_per_head, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> logits, numerator;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / blocks_per_head;
        const int64_t m_begin = (task % blocks_per_head) * kQueryBlock;
        attend_block(args, bh, m_begin, std::min(m, m_begin + kQueryBlock), o, logits, numerator);
      }
    });
  });
  return out.view(out_shape).to(query.scalar_type());
}

}  // namespace
}  // namespace cpu
}  // namespace wildcat

TORCH_LIBRARY_IMPL(wildcat, CPU, m) {
  m.impl("coreset_attention", TORCH_FN(wildcat::cpu::coreset_attention_cpu));
}
