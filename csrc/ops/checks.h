// Argument validation shared by every backend of every op, so that the CPU and CUDA kernels
// reject bad input with the same message. Errors name the argument, what was expected and what
// was given; shape and value errors raise ValueError in Python, dtype errors TypeError.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

#include "../kernels/temperature.h"

namespace wildcat {
namespace detail {

// Float64 inputs are computed in float64 (the oracle's precision); every other dtype in float32.
at::ScalarType accumulate_type(at::ScalarType input);

// 1 / sqrt(head_dim) unless given.
double resolve_scale(const std::optional<double>& scale, int64_t head_dim);

kernels::TauMode parse_tau(std::string_view tau);

// The seed tensor: one int64 element on the CPU or on the device of `like`.
void check_seed(const char* op, const std::optional<at::Tensor>& seed, const at::Tensor& like);

// The seed's value for host code (0 when absent); only for seeds on the CPU.
uint64_t host_seed(const std::optional<at::Tensor>& seed);

void check_rp_nystrom_args(const at::Tensor& points, int64_t rank,
                           const std::optional<at::Tensor>& seed, double tol);

void check_compress_kv_args(const at::Tensor& keys, const at::Tensor& values, int64_t rank,
                            int64_t num_bins, const std::optional<double>& scale,
                            const std::optional<at::Tensor>& query_norm,
                            const std::optional<at::Tensor>& seed, std::string_view tau, double tol,
                            const std::optional<at::Tensor>& lengths);

// The values of compress_kv's `lengths` lie in [0, n]. Only for lengths on the CPU (reading device
// memory would synchronise; the CUDA kernels clamp instead).
void check_lengths_values(const std::optional<at::Tensor>& lengths, int64_t n);

void check_coreset_attention_args(const at::Tensor& query, const at::Tensor& core_keys,
                                  const at::Tensor& core_values, const at::Tensor& core_weights,
                                  const std::optional<double>& scale,
                                  const std::optional<at::Tensor>& value_min,
                                  const std::optional<at::Tensor>& value_max, bool center_values);

}  // namespace detail
}  // namespace wildcat
