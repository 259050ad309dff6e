// Constants of block pivoting (ALGORITHM.md §7), shared by the CPU and CUDA code (and mirrored in
// wildcat/reference.py): which bins choose their pivots in rounds, how many draws a round takes,
// and where in the Philox stream (philox.h) its draws and acceptance uniforms lie.
#pragma once

#include "common.h"

namespace wildcat {
namespace kernels {

// Bins with more slots than this choose their pivots in rounds; the others one per step (§2.7).
constexpr int64_t kSequentialMaxSlots = 16;
// Draws per round: each is a pivot candidate sampled from the residual at the round's start.
constexpr int kBlockDraws = 32;

WILDCAT_HD bool uses_block_pivoting(int64_t slots) { return slots > kSequentialMaxSlots; }

// Philox `step` words of draw j of round t (noise E at every position) and of its acceptance
// uniform (at the bin's first position). Bits 30 and 31 keep them apart from each other and from
// the one-pivot steps 0 … r_b − 1.
WILDCAT_HD uint32_t block_draw_step(int64_t round, int draw) {
  return 0x40000000u + static_cast<uint32_t>(round * kBlockDraws + draw);
}
WILDCAT_HD uint32_t block_accept_step(int64_t round, int draw) {
  return 0x80000000u + static_cast<uint32_t>(round * kBlockDraws + draw);
}

}  // namespace kernels
}  // namespace wildcat
