// The registered ops and the header API: schemas resolve, calls dispatch, shapes and dtypes follow
// csrc/library.cpp, r >= N is exact attention, and the seed alone decides the pivots.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>

#include "catch_compat.h"
#include "wildcat/wildcat.h"

namespace {

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

}  // namespace

TEST_CASE("every op schema is registered with a CPU kernel") {
  for (const char* name : {"wildcat::rp_nystrom", "wildcat::compress_kv", "wildcat::coreset_attention"}) {
    CAPTURE(name);
    const auto op = c10::Dispatcher::singleton().findSchema({name, ""});
    REQUIRE(op.has_value());
    CHECK(op->hasKernelForDispatchKey(c10::DispatchKey::CPU));
  }
}

TEST_CASE("attention returns (B, H, M, D) within each head's value range") {
  const int64_t value_dim = GENERATE(16, 8);
  CAPTURE(value_dim);
  at::manual_seed(1);
  const at::Tensor q = at::randn({2, 3, 40, 16});
  const at::Tensor k = at::randn({2, 3, 40, 16});
  const at::Tensor v = at::randn({2, 3, 40, value_dim});

  const at::Tensor out = wildcat::attention(q, k, v, wildcat::Options().rank(16).num_bins(2).seed(3));

  REQUIRE(out.sizes() == at::IntArrayRef({2, 3, 40, value_dim}));
  CHECK(out.scalar_type() == at::kFloat);
  CHECK(at::isfinite(out).all().item<bool>());
  // WildCat clamps to the column-wise value bounds of the head (ALGORITHM.md §3).
  CHECK((out >= v.amin(-2, /*keepdim=*/true)).all().item<bool>());
  CHECK((out <= v.amax(-2, /*keepdim=*/true)).all().item<bool>());
}

TEST_CASE("rank >= N gives exact attention") {
  const int64_t num_bins = GENERATE(1, 4);
  CAPTURE(num_bins);
  at::manual_seed(2);
  const at::Tensor q = at::randn({2, 3, 24, 16}, at::kDouble);
  const at::Tensor k = at::randn({2, 3, 40, 16}, at::kDouble);
  const at::Tensor v = at::randn({2, 3, 40, 8}, at::kDouble);
  const auto options = wildcat::Options().rank(64).num_bins(num_bins).seed(5);

  const double scale = 1.0 / std::sqrt(16.0);
  const at::Tensor exact = at::softmax(q.matmul(k.transpose(-1, -2)) * scale, -1).matmul(v);
  CHECK(max_abs_diff(wildcat::attention(q, k, v, options), exact) <= 1e-10);

  const at::Tensor qf = q.to(at::kFloat), kf = k.to(at::kFloat), vf = v.to(at::kFloat);
  const at::Tensor sdpa = at::scaled_dot_product_attention(qf, kf, vf);
  CHECK(max_abs_diff(wildcat::attention(qf, kf, vf, options), sdpa) <= 1e-5);
}

TEST_CASE("compress_kv returns the documented shapes and dtypes") {
  const auto dtype = GENERATE(at::kFloat, at::kDouble);
  const int64_t n = GENERATE(200, 10);
  CAPTURE(dtype, n);
  const int64_t rank = 16, kept = std::min<int64_t>(rank, n);
  at::manual_seed(3);
  const at::Tensor keys = at::randn({2, 3, n, 16}, dtype);
  const at::Tensor values = at::randn({2, 3, n, 8}, dtype);

  const wildcat::CompressedKV kv =
      wildcat::compress_kv(keys, values, wildcat::Options().rank(rank).num_bins(2).seed(7));

  CHECK(kv.core_keys.sizes() == at::IntArrayRef({2, 3, kept, 16}));
  CHECK(kv.core_values.sizes() == at::IntArrayRef({2, 3, kept, 8}));
  CHECK(kv.core_weights.sizes() == at::IntArrayRef({2, 3, kept}));
  CHECK(kv.core_indices.sizes() == at::IntArrayRef({2, 3, kept}));
  CHECK(kv.value_min.sizes() == at::IntArrayRef({2, 3, 8}));
  CHECK(kv.value_max.sizes() == at::IntArrayRef({2, 3, 8}));
  CHECK(kv.core_keys.scalar_type() == dtype);
  for (const at::Tensor& t : {kv.core_values, kv.core_weights, kv.value_min, kv.value_max}) {
    CHECK(t.scalar_type() == dtype);  // float32 accumulation for float32, float64 for float64
  }
  REQUIRE(kv.core_indices.scalar_type() == at::kLong);
  CHECK(kv.core_indices.min().item<int64_t>() >= 0);
  CHECK(kv.core_indices.max().item<int64_t>() < n);
  // core_keys are the original keys at the pivots.
  const at::Tensor gathered = keys.gather(-2, kv.core_indices.unsqueeze(-1).expand({2, 3, kept, 16}));
  CHECK(at::equal(kv.core_keys, gathered));
  CHECK(at::equal(kv.value_min, values.amin(-2)));
  CHECK(at::equal(kv.value_max, values.amax(-2)));
}

TEST_CASE("compress_kv: the seed alone decides the result") {
  at::manual_seed(4);
  const at::Tensor keys = at::randn({2, 3, 200, 16});
  const at::Tensor values = at::randn({2, 3, 200, 8});
  const auto options = wildcat::Options().rank(16).num_bins(2);

  const wildcat::CompressedKV first = wildcat::compress_kv(keys, values, wildcat::Options(options).seed(11));
  const wildcat::CompressedKV again = wildcat::compress_kv(keys, values, wildcat::Options(options).seed(11));
  const wildcat::CompressedKV other = wildcat::compress_kv(keys, values, wildcat::Options(options).seed(12));

  CHECK(at::equal(first.core_keys, again.core_keys));
  CHECK(at::equal(first.core_values, again.core_values));
  CHECK(at::equal(first.core_weights, again.core_weights));
  CHECK(at::equal(first.core_indices, again.core_indices));
  CHECK(at::equal(first.value_min, again.value_min));
  CHECK(at::equal(first.value_max, again.value_max));
  CHECK_FALSE(at::equal(first.core_indices, other.core_indices));
}
