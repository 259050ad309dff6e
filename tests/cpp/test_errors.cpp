// Bad input raises c10::ValueError (shapes, values) or c10::TypeError (dtypes), which Python sees
// as ValueError and TypeError.
#include <ATen/ATen.h>

#include "catch_compat.h"
#include "wildcat/wildcat.h"

namespace {

const wildcat::Options kOptions = wildcat::Options().rank(4).num_bins(1);

wildcat::CompressedKV compress(const at::Tensor& keys, const at::Tensor& values,
                               const wildcat::Options& options = kOptions) {
  return wildcat::compress_kv(keys, values, options);
}

}  // namespace

TEST_CASE("compress_kv rejects bad shapes") {
  CHECK_THROWS_AS(compress(at::randn({8}), at::randn({8})), c10::ValueError);
  CHECK_THROWS_AS(compress(at::randn({2, 10, 4}), at::randn({2, 11, 4})), c10::ValueError);
}

TEST_CASE("compress_kv rejects bad dtypes") {
  CHECK_THROWS_AS(compress(at::ones({2, 10, 4}, at::kLong), at::randn({2, 10, 4})), c10::TypeError);
  CHECK_THROWS_AS(compress(at::randn({2, 10, 4}), at::randn({2, 10, 4}, at::kDouble)), c10::TypeError);
}

TEST_CASE("compress_kv rejects bad options") {
  const at::Tensor keys = at::randn({2, 10, 4});
  const at::Tensor values = at::randn({2, 10, 4});
  CHECK_NOTHROW(compress(keys, values));
  CHECK_THROWS_AS(compress(keys, values, wildcat::Options().rank(0)), c10::ValueError);
  CHECK_THROWS_AS(compress(keys, values, wildcat::Options().num_bins(0)), c10::ValueError);
  CHECK_THROWS_AS(compress(keys, values, wildcat::Options().rank(16).num_bins(11)), c10::ValueError);
  CHECK_THROWS_AS(compress(keys, values, wildcat::Options().scale(0.0)), c10::ValueError);
  CHECK_THROWS_AS(compress(keys, values, wildcat::Options().scale(-1.0)), c10::ValueError);
  CHECK_THROWS_AS(compress(keys, values, wildcat::Options().tau("bogus")), c10::ValueError);
}

TEST_CASE("coreset_attention rejects a query whose E differs from the core keys'") {
  const wildcat::CompressedKV kv = compress(at::randn({1, 2, 10, 16}), at::randn({1, 2, 10, 8}));
  CHECK_NOTHROW(wildcat::coreset_attention(at::randn({1, 2, 5, 16}), kv));
  CHECK_THROWS_AS(wildcat::coreset_attention(at::randn({1, 2, 5, 8}), kv), c10::ValueError);
}
