// wildcat: WildCat attention (weighted coreset attention) for LibTorch.
//
//   #include <wildcat/wildcat.h>
//   at::Tensor out = wildcat::attention(q, k, v, wildcat::Options().rank(128).num_bins(16));
//
// Every function goes through the PyTorch dispatcher (ops registered as torch.ops.wildcat.*), so
// the backend follows the tensors' device. Linking wildcat::wildcat registers the ops.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace wildcat {

// Settings of WildCat attention (ALGORITHM.md); defaults match the Python API.
struct Options {
  int64_t rank_ = 128;          // r: coreset size per kv head
  int64_t num_bins_ = 1;        // C: contiguous bins compressed independently
  std::optional<double> scale_; // softmax scale β; default 1/sqrt(E)
  int64_t seed_ = 0;            // seed of the pivot sampling
  std::string tau_ = "lambert"; // temperature: "lambert" (closed form) or "constant"
  bool center_values_ = false;  // compress values relative to the middle of their range
  double tol_ = 1e-5;           // residual below which a key counts as represented

  Options& rank(int64_t v) { rank_ = v; return *this; }
  Options& num_bins(int64_t v) { num_bins_ = v; return *this; }
  Options& scale(double v) { scale_ = v; return *this; }
  Options& seed(int64_t v) { seed_ = v; return *this; }
  Options& tau(std::string v) { tau_ = std::move(v); return *this; }
  Options& center_values(bool v) { center_values_ = v; return *this; }
  Options& tol(double v) { tol_ = v; return *this; }
};

// A weighted coreset per group, as compress_kv returns it (shapes in csrc/library.cpp).
struct CompressedKV {
  at::Tensor core_keys, core_values, core_weights, core_indices, value_min, value_max;
};

// The registered ops, one to one (schemas and shapes in csrc/library.cpp). A seed is a one-element
// int64 tensor (see seed_tensor), on the CPU or on the inputs' device; none means seed 0.
namespace ops {
std::tuple<at::Tensor, at::Tensor, at::Tensor> rp_nystrom(
    const at::Tensor& points, int64_t rank, const std::optional<at::Tensor>& seed = std::nullopt,
    double tol = 1e-5);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> compress_kv(
    const at::Tensor& keys, const at::Tensor& values, int64_t rank, int64_t num_bins = 1,
    std::optional<double> scale = std::nullopt,
    const std::optional<at::Tensor>& query_norm = std::nullopt,
    const std::optional<at::Tensor>& seed = std::nullopt, const std::string& tau = "lambert",
    bool center_values = false, double tol = 1e-5, const std::optional<at::Tensor>& lengths = std::nullopt);
at::Tensor coreset_attention(const at::Tensor& query, const at::Tensor& core_keys,
                             const at::Tensor& core_values, const at::Tensor& core_weights,
                             std::optional<double> scale = std::nullopt,
                             const std::optional<at::Tensor>& value_min = std::nullopt,
                             const std::optional<at::Tensor>& value_max = std::nullopt,
                             bool center_values = false);
}  // namespace ops

// A seed for the ops: a one-element int64 CPU tensor.
at::Tensor seed_tensor(int64_t seed);

// Compress keys (..., N, E) and values (..., N, D). query_norm (...): the largest query norm per
// group (attention mode); omit it for query-agnostic compression (KV caches).
CompressedKV compress_kv(const at::Tensor& keys, const at::Tensor& values, const Options& options = {},
                         const std::optional<at::Tensor>& query_norm = std::nullopt);

// Attention of query (..., Hq, M, E) over a compressed key/value set (Hq a multiple of Hkv).
at::Tensor coreset_attention(const at::Tensor& query, const CompressedKV& kv, const Options& options = {});

// R_q per kv head: the largest norm over the queries of every query head sharing it.
// query (..., Hq, M, E) → (..., Hkv); a rank-2 query (M, E) gives a 0-dim tensor.
at::Tensor query_norm_per_kv_head(const at::Tensor& query, int64_t kv_heads);

// WildCat attention of query (..., Hq, M, E) with key (..., Hkv, N, E) and value (..., Hkv, N, D):
// compress every kv head with the query norm of its group, then attend. Returns (..., Hq, M, D).
// WildCat at every length: unlike the Python SDPA function, no exact fallback below a length.
at::Tensor attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const Options& options = {});

// Whether this build of wildcat has CUDA kernels.
bool cuda_built();

}  // namespace wildcat
