// The C++ API computes what the Python API computes for the same inputs and seed (fixture from
// make_fixture.py). Hidden ([.]): ctest runs it after writing the fixture.
#include <ATen/ATen.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

#include "catch_compat.h"
#include "wildcat/wildcat.h"

namespace {

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

}  // namespace

TEST_CASE("the C++ API matches the Python API", "[.][parity]") {
  const char* path = std::getenv("WILDCAT_PARITY_FIXTURE");
  if (path == nullptr || !std::filesystem::exists(path)) {
    WARN("wildcat parity: skipped, no fixture (set WILDCAT_PARITY_FIXTURE to the output of "
         "tests/cpp/make_fixture.py)");
    return;
  }
  std::ifstream file(path, std::ios::binary);
  const std::vector<char> bytes{std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
  const c10::Dict<c10::IValue, c10::IValue> fixture = torch::jit::pickle_load(bytes).toGenericDict();
  const auto tensor = [&](const char* name) { return fixture.at(name).toTensor(); };

  const at::Tensor query = tensor("query"), key = tensor("key"), value = tensor("value");
  REQUIRE(query.scalar_type() == at::kDouble);
  const auto options = wildcat::Options()
                           .rank(fixture.at("rank").toInt())
                           .num_bins(fixture.at("num_bins").toInt())
                           .seed(fixture.at("seed").toInt());

  const wildcat::CompressedKV kv = wildcat::compress_kv(
      key, value, options, wildcat::query_norm_per_kv_head(query, key.size(-3)));
  CHECK(at::equal(kv.core_indices, tensor("core_indices")));
  CHECK(at::equal(kv.core_keys, tensor("core_keys")));
  CHECK(max_abs_diff(kv.core_values, tensor("core_values")) <= 1e-12);
  CHECK(max_abs_diff(kv.core_weights, tensor("core_weights")) <= 1e-12);
  CHECK(at::equal(kv.value_min, tensor("value_min")));
  CHECK(at::equal(kv.value_max, tensor("value_max")));
  CHECK(max_abs_diff(wildcat::coreset_attention(query, kv, options), tensor("coreset_attention")) <= 1e-12);
  CHECK(max_abs_diff(wildcat::attention(query, key, value, options), tensor("attention")) <= 1e-12);
}
