"""Code paths that exist only on CUDA, checked against the paths the CPU suite already proves.

Marked `gpu`: skipped where no CUDA device is visible (tests/conftest.py), run by
`python -m forge_lm.tools.gpu_check` on a GPU machine. The Triton kernels' bf16 tests are in
test_kernels.py under the same marker.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from forge_lm.trainer.inference import Generator
from forge_lm.trainer.model.masks import flex_block_mask, sdpa_mask
from tests.unit.test_inference import prompts, tiny

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("case", ["causal", "documents", "window", "documents_and_window"])
def test_flex_block_masks_equal_the_sdpa_masks(case):
    """FlexAttention with our BlockMask gives SDPA's output with our boolean mask (T not a block multiple)."""
    torch.manual_seed(0)
    B, H, T, D, device = 2, 4, 300, 64, torch.device("cuda")
    q, k, v = (torch.randn(B, H, T, D, device=device) for _ in range(3))
    docs = window = None
    if "documents" in case:
        lengths = [[90, 150, 60], [300]]
        docs = torch.stack([torch.repeat_interleave(torch.arange(len(x)), torch.tensor(x)) for x in lengths])
        docs = docs.to(device)
    if "window" in case:
        window = 37
    mask = sdpa_mask(T, device, docs, window)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    got = torch.compile(flex_attention)(q, k, v, block_mask=flex_block_mask(B, T, device, docs, window))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family", ["llama3", "gemma3", "qwen3_moe"])
def test_cuda_graph_decode_equals_eager(family):
    """The compiled decode step (mode reduce-overhead: CUDA graphs over static cache addresses) gives the
    eager tokens, for two batches in a row (the second replays the captured graph)."""
    model = tiny(family).cuda()
    for seed in (1, 7):
        batch = prompts(seed=seed)
        eager = [c.token_ids for c in Generator(model, compile=False).generate(batch, 24)]
        graphed = Generator(model, compile=True)
        assert [c.token_ids for c in graphed.generate(batch, 24)] == eager
