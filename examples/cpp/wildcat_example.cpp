// WildCat attention against exact attention on random inputs: error and time for a few settings.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <wildcat/wildcat.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

namespace {

// Best of three runs after a warm-up, in milliseconds.
template <typename F>
double milliseconds(F&& run) {
  run();
  double best = 1e300;
  for (int i = 0; i < 3; ++i) {
    const auto start = std::chrono::steady_clock::now();
    run();
    const std::chrono::duration<double, std::milli> elapsed = std::chrono::steady_clock::now() - start;
    best = std::min(best, elapsed.count());
  }
  return best;
}

}  // namespace

int main() {
  const int batch = 1, heads = 4, length = 2048, head_dim = 64;
  at::manual_seed(0);
  const at::Tensor q = at::randn({batch, heads, length, head_dim});
  const at::Tensor k = at::randn({batch, heads, length, head_dim});
  const at::Tensor v = at::randn({batch, heads, length, head_dim});

  at::Tensor exact;
  const double exact_ms = milliseconds([&] { exact = at::scaled_dot_product_attention(q, k, v); });
  std::printf("B=%d H=%d N=%d E=D=%d float32, %d threads; scaled_dot_product_attention: %.2f ms\n",
              batch, heads, length, head_dim, at::get_num_threads(), exact_ms);
  std::printf("%6s %9s %16s %14s %12s\n", "rank", "num_bins", "rel. Frobenius", "max abs err", "wildcat ms");
  for (const int rank : {64, 256}) {
    for (const int num_bins : {1, 8}) {
      const auto options = wildcat::Options().rank(rank).num_bins(num_bins).seed(0);
      at::Tensor out;
      const double wildcat_ms = milliseconds([&] { out = wildcat::attention(q, k, v, options); });
      const double relative = ((out - exact).norm() / exact.norm()).item<double>();
      const double max_abs = (out - exact).abs().max().item<double>();
      std::printf("%6d %9d %16.4e %14.4e %12.2f\n", rank, num_bins, relative, max_abs, wildcat_ms);
    }
  }
  return 0;
}
