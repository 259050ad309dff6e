// Philox4x32-10 of csrc/kernels/philox.h against the Random123 known-answer vectors
// (kat_vectors, philox4x32_10) and against ATen's engine, which implements the same generator.
#include <ATen/core/PhiloxRNGEngine.h>

#include <array>
#include <cstdint>
#include <random>

#include "catch_compat.h"
#include "kernels/philox.h"

namespace {

using Words = std::array<uint32_t, 4>;

Words philox(const Words& counter, uint32_t key0, uint32_t key1) {
  const wildcat::kernels::Philox4 out = wildcat::kernels::philox4x32_10(
      {{counter[0], counter[1], counter[2], counter[3]}}, key0, key1);
  return {out.v[0], out.v[1], out.v[2], out.v[3]};
}

}  // namespace

TEST_CASE("philox4x32_10 reproduces the Random123 known answers") {
  CHECK(philox({0, 0, 0, 0}, 0, 0) == Words{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8});
  CHECK(philox({0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, 0xffffffff, 0xffffffff) ==
        Words{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd});
  CHECK(philox({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, 0xa4093822, 0x299f31d0) ==
        Words{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1});
}

TEST_CASE("philox4x32_10 matches ATen's Philox4_32") {
  // ATen's engine runs on counter (offset lo, offset hi, subsequence lo, subsequence hi) and key
  // (seed lo, seed hi), returning the four words of one block on four calls.
  std::mt19937_64 draw(2024);
  for (int trial = 0; trial < 100; ++trial) {
    const uint64_t seed = draw(), subsequence = draw(), offset = draw();
    at::Philox4_32 engine(seed, subsequence, offset);
    const Words expected{engine(), engine(), engine(), engine()};
    const Words counter{static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                        static_cast<uint32_t>(subsequence), static_cast<uint32_t>(subsequence >> 32)};
    CAPTURE(seed, subsequence, offset);
    REQUIRE(philox(counter, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)) == expected);
  }
}
