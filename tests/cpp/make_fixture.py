"""Writes the fixture of the C++ parity test (test_parity.cpp): fixed float64 inputs, the
settings, and what the Python API returns for them, as a dict saved with torch.save (LibTorch
reads it with torch::pickle_load).

Usage: make_fixture.py OUTPUT. Exits 77 (ctest: skipped) when torch or wildcat is not installed;
a wildcat that is installed but fails to load is an error, not a skip.
"""

import os
import sys

SKIP = 77


def main(path: str) -> int:
    # A fixture left by an earlier run must not stand in for this one's.
    if os.path.exists(path):
        os.remove(path)
    try:
        import torch
        import wildcat
    except ModuleNotFoundError as error:
        if error.name not in ("torch", "wildcat"):
            raise
        print(f"wildcat parity: skipped, cannot import wildcat in {sys.executable}: {error}")
        return SKIP

    torch.manual_seed(0)
    # Grouped-query (4 query heads on 2 kv heads), E != D, N not a multiple of num_bins.
    query = torch.randn(2, 4, 24, 16, dtype=torch.float64)
    key = torch.randn(2, 2, 70, 16, dtype=torch.float64)
    value = torch.randn(2, 2, 70, 12, dtype=torch.float64)
    rank, num_bins, seed = 24, 3, 12345

    query_norm = wildcat.reference.query_norm_per_kv_head(query, key.shape[-3])
    kv = wildcat.compress_kv(key, value, rank, num_bins, query_norm=query_norm, seed=seed)
    fixture = {
        "query": query,
        "key": key,
        "value": value,
        "rank": rank,
        "num_bins": num_bins,
        "seed": seed,
        "core_keys": kv.core_keys,
        "core_values": kv.core_values,
        "core_weights": kv.core_weights,
        "core_indices": kv.core_indices,
        "value_min": kv.value_min,
        "value_max": kv.value_max,
        "coreset_attention": wildcat.coreset_attention(query, kv),
        # min_seq_len=0: wildcat::attention in C++ is WildCat at every length (no exact fallback)
        "attention": wildcat.scaled_dot_product_attention(
            query, key, value, enable_gqa=True, r=rank, num_bins=num_bins, seed=seed, min_seq_len=0),
    }
    torch.save(fixture, path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
