"""Our files against the peer libraries' own code, where they install (scripts/setup tries; a test is
skipped only when its library is missing)."""

from __future__ import annotations

import pytest
import torch
from featureatlas.ingest.loaders import load_dictionary
from featureatlas.ingest.sae import ARCHITECTURES, SAE


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_saelens_reads_ours_and_we_read_theirs(tmp_path, architecture):
    sae_lens = pytest.importorskip("sae_lens")
    ours = SAE.initialized(16, 48, 4, architecture=architecture, seed=0,
                           meta={"model_name": "m", "hook_name": "blocks.1.hook_resid_post", "hook_layer": 1})
    with torch.no_grad():
        ours.b_enc.normal_(generator=torch.Generator().manual_seed(1))
        ours.b_dec.normal_(generator=torch.Generator().manual_seed(2))
        if hasattr(ours, "threshold"):
            ours.threshold.uniform_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
    ours.save(tmp_path / "ours")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "ours"), device="cpu")
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(4)) * 2
    with torch.no_grad():
        expected = theirs.encode(x)
        torch.testing.assert_close(ours.activations(x), expected, rtol=1e-5, atol=1e-5)
        theirs.save_model(str(tmp_path / "theirs"))
        back = load_dictionary(tmp_path / "theirs", k=4)
        torch.testing.assert_close(back.activations(x), expected, rtol=1e-5, atol=1e-5)


def test_sparsify_reads_as_it_encodes(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    coder = sparsify.SparseCoder(16, sparsify.SparseCoderConfig(num_latents=48, k=4), device="cpu")
    with torch.no_grad():
        coder.encoder.bias.normal_(generator=torch.Generator().manual_seed(1))
        coder.b_dec.normal_(generator=torch.Generator().manual_seed(2))
    coder.save_to_disk(tmp_path / "layers.3")
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = coder.encode(x)
        expected = torch.zeros(64, 48).scatter(-1, out.top_indices, out.top_acts)
        ours = load_dictionary(tmp_path / "layers.3", k=8)
        torch.testing.assert_close(ours.activations(x), expected, rtol=1e-5, atol=1e-5)
    assert ours.meta["hook_layer"] == 3
