"""Who attends to whom: packed documents, sliding windows, and the two mask backends (SDPA, FlexAttention)."""

from __future__ import annotations

import pytest
import torch

from forge_lm.trainer.model import Decoder
from forge_lm.trainer.model.families import preset
from forge_lm.trainer.model.masks import flex_block_mask, positions_in_documents, sdpa_mask

VOCAB = 256


def tiny(family: str, **overrides) -> Decoder:
    o = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, init_std=0.1)
    if family in ("gemma2", "gemma3", "mixtral"):
        o["sliding_window"] = 6  # shorter than the documents, so windows and documents interact
    if family == "gemma3":
        o.update(n_layers=3, full_attention_every=3)
    if family == "gemma2":
        o.update(attn_softcap=5.0, final_softcap=3.0)
    if family in ("qwen3_moe", "mixtral"):
        o.update(moe=dict(num_experts=4, top_k=2), ffn_dim=48)
    o.update(overrides)
    return Decoder.build(preset(f"{family}_tiny", **o), seed=0).eval()


DOCS = [[5, 11, 8], [24], [3, 1, 20]]  # document lengths in each of three packed rows of 24 tokens


def packed_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (len(DOCS), 24), generator=g)
    docs = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in DOCS])
    return x, docs


@pytest.mark.parametrize(
    "family", ["llama3", "qwen2", "gemma2", "gemma3", "glm4", "olmo2", "qwen3_moe", "mixtral"]
)
def test_packed_documents_get_the_logits_they_get_alone(family: str) -> None:
    model = tiny(family)
    x, docs = packed_batch()
    with torch.no_grad():
        packed = model(x, document_ids=docs)  # positions restart per document by default
        assert torch.equal(packed, model(x, position_ids=positions_in_documents(docs), document_ids=docs))
        for row, lengths in enumerate(DOCS):
            start = 0
            for n in lengths:
                alone = model(x[row : row + 1, start : start + n])[0]
                assert (packed[row, start : start + n] - alone).abs().max().item() <= 1e-5
                start += n
        # Control: without the document mask the later documents see the earlier ones.
        leaky = model(x, position_ids=positions_in_documents(docs))
        assert (leaky[0, 5:] - packed[0, 5:]).abs().max().item() > 1e-3


def test_positions_restart_at_each_document() -> None:
    docs = torch.tensor([[0, 0, 0, 1, 1, 2], [7, 7, 7, 7, 7, 7], [1, 2, 2, 3, 3, 3]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [0, 0, 1, 0, 1, 2]])
    assert torch.equal(positions_in_documents(docs), expected)


def test_sdpa_mask_rule() -> None:
    docs = torch.tensor([[0, 0, 0, 0, 1, 1]])
    mask = sdpa_mask(6, torch.device("cpu"), docs, window=3)[0, 0]
    q, k = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    expected = (k <= q) & (q - k < 3) & (docs[0][q] == docs[0][k])
    assert torch.equal(mask, expected)
    assert mask[3].tolist() == [False, True, True, True, False, False]  # the window: itself and 2 before
    assert sdpa_mask(6, torch.device("cpu")) is None  # plain causal: SDPA's is_causal fast path


def test_sliding_window_bounds_what_a_layer_sees() -> None:
    """One sliding layer with window 6: changing token 0 changes outputs 0..5 only."""
    model = tiny("mixtral", n_layers=1)
    x = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[0, 0] = (x[0, 0] + 1) % VOCAB
    with torch.no_grad():
        lx, ly = model(x), model(y)
    changed = ((lx - ly).abs().amax(-1) > 0)[0].tolist()
    assert changed == [True] * 6 + [False] * 10


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("family", ["llama3", "gemma2", "gemma3"])
def test_flex_attention_masks_match_sdpa(family: str) -> None:
    """The FlexAttention path (block masks, score_mod soft-capping), run on CPU without autograd, gives the
    SDPA path's logits: documents, windows and soft-caps are the same rule in both."""
    sdpa = tiny(family, attention_backend="sdpa")
    flex = tiny(family, attention_backend="flex")
    flex.load_state_dict(sdpa.state_dict())
    x, docs = packed_batch(seed=1)
    with torch.no_grad():
        assert (flex(x, document_ids=docs) - sdpa(x, document_ids=docs)).abs().max().item() <= 1e-5
        assert (flex(x) - sdpa(x)).abs().max().item() <= 1e-5


def test_flex_block_mask_is_the_sdpa_rule() -> None:
    x, docs = packed_batch()
    block = flex_block_mask(3, 24, torch.device("cpu"), docs, window=6)
    dense = block.to_dense()  # [B, 1, blocks, blocks] of the 128-token blocks: one block here
    assert dense.shape[0] == 3 and bool(dense.all())
    mask = sdpa_mask(24, torch.device("cpu"), docs, window=6)
    for b in range(3):
        for q in range(24):
            row = [
                bool(block.mask_mod(torch.tensor(b), 0, torch.tensor(q), torch.tensor(k))) for k in range(24)
            ]
            assert row == mask[b, 0, q].tolist()
