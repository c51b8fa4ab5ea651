"""The plugin author's own unit test: run with `pytest` inside this folder."""

import torch

from kiln_weight_sharing.plugin import cluster


def test_cluster_uses_k_values_and_stays_close():
    torch.manual_seed(0)
    weights = torch.randn(64, 128)
    codebook, indices = cluster(weights, 16, 25)
    assert codebook.shape == (16,) and indices.dtype == torch.uint8 and indices.shape == weights.shape
    rebuilt = codebook[indices.long()]
    assert len(torch.unique(rebuilt)) <= 16
    assert (rebuilt - weights).abs().mean() < 0.1 * weights.abs().mean()
