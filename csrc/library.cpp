// Every wildcat op's schema, registered once. Backends add kernels with TORCH_LIBRARY_IMPL in
// ops/cpu and ops/cuda; the Python package adds fake (meta) kernels for torch.compile.
//
// Ops are functional (they return new tensors) and their output shapes depend only on input
// shapes and int arguments, so fake kernels are trivial and nothing in them syncs with the host.
// Randomness is an explicit seed feeding a counter-based generator (csrc/kernels/philox.h). The
// seed is a one-element int64 tensor (None means 0), on the CPU or on the inputs' device: a
// seed drawn on the GPU is read by the kernel, so every replay of a captured CUDA graph samples
// afresh, and torch.compile can trace the seed as a tensor.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY(wildcat, m) {
  // ALGORITHM.md §2.7. Randomly pivoted Cholesky on the Gaussian kernel of pre-scaled points
  // (..., N, E), pivots sampled ∝ d_l exp(|x_l|^2). Returns, with r' = min(rank, N):
  //   pivots (..., r') int64; kinv = G_SS^-1 (..., r', r'); rows = G(x_S, x) (..., r', N),
  //   float32 (float64 for float64 points). Slots after an early stop (every residual <= tol)
  //   repeat the first pivot and have zero rows and columns.
  m.def("rp_nystrom(Tensor points, int rank, Tensor? seed=None, float tol=1e-05) -> "
        "(Tensor pivots, Tensor kinv, Tensor rows)",
        {at::Tag::pt2_compliant_tag});

  // ALGORITHM.md §2. Weighted coreset of keys (..., N, E) and values (..., N, D) per group (every
  // leading index), r' = min(rank, N) entries laid out bin after bin:
  //   core_keys (..., r', E) the original keys at the pivots (input dtype, not centred);
  //   core_values (..., r', D) and core_weights (..., r') the signed Nyström-compressed values
  //     V̂ = W V and weights w = W 1, float32 (float64 for float64 input);
  //   core_indices (..., r') int64 positions of the pivots;
  //   value_min, value_max (..., D) column-wise value bounds (same dtype as core_values).
  // query_norm (...): R_q per group (attention mode); None: R_q = R_k per bin (query-agnostic).
  // scale: softmax scale β, default 1/sqrt(E). tau: "lambert" (closed form) or "constant".
  // center_values: compress V - (v_min + v_max)/2; coreset_attention must then add it back.
  // lengths (...) int64: only the first lengths[g] keys of group g exist (key padding); the bins
  //   split those, value bounds and mean cover those, and the slots they cannot fill get zero
  //   weight and value and the index of a kept key (0 for an empty group, whose bounds are 0).
  //   Values must lie in [0, N] (checked on the CPU; clamped by the CUDA kernels).
  m.def("compress_kv(Tensor keys, Tensor values, int rank, int num_bins=1, float? scale=None, "
        "Tensor? query_norm=None, Tensor? seed=None, str tau=\"lambert\", bool center_values=False, "
        "float tol=1e-05, Tensor? lengths=None) -> (Tensor core_keys, Tensor core_values, Tensor core_weights, "
        "Tensor core_indices, Tensor value_min, Tensor value_max)",
        {at::Tag::pt2_compliant_tag});

  // ALGORITHM.md §3. Attention of query (..., Hq, M, E) over the weighted coreset of its kv head
  // (core tensors (..., Hkv, r, ·), Hq a multiple of Hkv): Σ_s e^{z_s} V̂_s / Σ_s e^{z_s} w_s with
  // z_s = β q·k_s, 0 where the denominator is not positive, plus (v_min + v_max)/2 if
  // center_values, clamped to [value_min, value_max] (each optional, (..., Hkv, D)).
  // Returns (..., Hq, M, D) in the query's dtype.
  m.def("coreset_attention(Tensor query, Tensor core_keys, Tensor core_values, Tensor core_weights, "
        "float? scale=None, Tensor? value_min=None, Tensor? value_max=None, "
        "bool center_values=False) -> Tensor",
        {at::Tag::pt2_compliant_tag});

  // R_q per kv head, the query norm compress_kv takes: the largest Euclidean norm over the M
  // queries of every query head sharing a kv head. query (..., Hq, M, E) → (..., kv_heads), Hq a
  // multiple of kv_heads; a rank-2 query (M, E) gives a 0-dim tensor. float32 (float64 for float64
  // queries); 0 for M = 0.
  m.def("query_norm(Tensor query, int kv_heads) -> Tensor", {at::Tag::pt2_compliant_tag});
}

// WildCat is an inference method (its pivots are sampled, not differentiated). The ops run below
// autograd; when an input requires grad, the outputs carry a node whose backward raises an error
// naming the op. Registered in C++ so that no Python runs on the dispatch path of any call.
TORCH_LIBRARY_IMPL(wildcat, Autograd, m) {
  m.impl("rp_nystrom", torch::autograd::autogradNotImplementedFallback());
  m.impl("compress_kv", torch::autograd::autogradNotImplementedFallback());
  m.impl("coreset_attention", torch::autograd::autogradNotImplementedFallback());
  m.impl("query_norm", torch::autograd::autogradNotImplementedFallback());
}
