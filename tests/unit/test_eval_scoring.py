"""lm_eval's scoring rules, batching, the two model calls (unsharded and through forward), metrics, and the
bytes per token behind bits per byte."""

from __future__ import annotations

import math
import random

import pytest
import torch

from forge_lm.data.tokenizer import load_tokenizer
from forge_lm.trainer.eval.scorers import IGNORE, DecoderScorer, ForwardScorer
from forge_lm.trainer.eval.scoring import TextEncoder, TokenRequest, rolling_windows, score_tokens, split_pair
from forge_lm.trainer.eval.tasks import ChoiceDoc, RollingDoc, Task
from forge_lm.trainer.eval.validation import measure, token_byte_lengths, val_metrics
from forge_lm.trainer.model import Decoder, ModelConfig
from tests.unit.conftest import SHAKESPEARE


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return load_tokenizer(gpt2_dir)


@pytest.fixture(scope="module")
def model(gpt2):
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64).with_vocab(
        gpt2.vocab_size
    )
    return Decoder.build(cfg, seed=1).eval()


def test_context_continuation_split_follows_lm_eval(gpt2):
    pytest.importorskip("lm_eval")
    enc = TextEncoder(gpt2)
    # Trailing spaces of the context move to the continuation; the continuation is what follows the context.
    r = split_pair(enc, "Question: who?\nAnswer: ", "Romeo")
    assert r.context == gpt2.encode("Question: who?\nAnswer:")
    assert gpt2.decode(r.context + r.continuation) == "Question: who?\nAnswer: Romeo"
    assert r.continuation == gpt2.encode("Question: who?\nAnswer: Romeo")[len(r.context) :]
    # An empty context becomes the prefix token (GPT-2 has no BOS: EOS) ...
    assert split_pair(enc, "", " Romeo") == TokenRequest([gpt2.eos_id], gpt2.encode(" Romeo"))
    # ... unless the continuation starts with it: then its first token is the context.
    romeo = gpt2.encode(" Romeo and Juliet")
    enc.prefix_id = romeo[0]
    assert split_pair(enc, "", " Romeo and Juliet") == TokenRequest(romeo[:1], romeo[1:])


@pytest.mark.parametrize("n, max_length", [(0, 8), (1, 8), (8, 8), (9, 8), (17, 8), (50, 7), (100, 1)])
def test_rolling_windows_equal_lm_evals(n, max_length):
    utils = pytest.importorskip("lm_eval.utils")
    tokens = list(range(1000, 1000 + n))
    theirs = [
        utils.make_disjoint_window(w)
        for w in utils.get_rolling_token_windows(
            token_list=tokens, prefix_token=7, max_seq_len=max_length, context_len=1
        )
    ]
    ours = rolling_windows(tokens, 7, max_length)
    assert [(w.context, w.continuation) for w in ours] == [(list(a), list(b)) for a, b in theirs]
    assert sum((w.continuation for w in ours), []) == tokens  # every token predicted exactly once


def _one_by_one(model, requests, max_length):
    """Reference: each request alone, through the full logits."""
    out = []
    for r in requests:
        row = (r.context + r.continuation)[-(max_length + 1) :]
        logits = model(torch.tensor([row[:-1]])).float()[0]
        logprobs = logits.log_softmax(-1)
        k = len(r.continuation)
        picked = [logprobs[len(row) - 1 - k + i, t].item() for i, t in enumerate(row[-k:])]
        greedy = all(logits[len(row) - 1 - k + i].argmax().item() == t for i, t in enumerate(row[-k:]))
        out.append((sum(picked), greedy))
    return out


def test_batched_scoring_equals_one_request_at_a_time_with_left_truncation(model, gpt2):
    rng = random.Random(0)
    requests = [
        TokenRequest(
            [rng.randrange(gpt2.vocab_size) for _ in range(rng.randint(1, 90))],
            [rng.randrange(gpt2.vocab_size) for _ in range(rng.randint(1, 6))],
        )
        for _ in range(13)
    ]
    want = _one_by_one(model, requests, max_length=40)  # several rows longer than 41: cut from the left
    for batch_size in (1, 4, 13):
        got = score_tokens(requests, DecoderScorer(model), max_length=40, batch_size=batch_size, greedy=True)
        assert [g for _, g in got] == [g for _, g in want]
        assert max(abs(a - b) for (a, _), (b, _) in zip(got, want)) < 1e-4


def test_forward_scorer_equals_decoder_scorer(model):
    """What a sharded run calls (forward with labels, or logits for greedy) gives Decoder.score's numbers."""
    torch.manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (3, 20))
    targets = torch.randint(0, model.cfg.vocab_size, (3, 20))
    targets[:, :7] = IGNORE
    lp, greedy = DecoderScorer(model)(ids, targets, True)
    lp2, none = ForwardScorer(model)(ids, targets, False)
    lp3, greedy3 = ForwardScorer(model)(ids, targets, True)
    assert none is None and torch.equal(greedy, greedy3)
    assert (
        (lp[:, :7] == 0).all() and torch.allclose(lp, lp2, atol=1e-5) and torch.allclose(lp, lp3, atol=1e-5)
    )


def test_empty_or_too_long_continuations_are_refused(model):
    with pytest.raises(ValueError, match="empty continuation"):
        score_tokens([TokenRequest([1], [])], DecoderScorer(model), 8, 2)
    with pytest.raises(ValueError, match="does not fit"):
        score_tokens([TokenRequest([1], list(range(9)))], DecoderScorer(model), 8, 2)


def test_multiple_choice_metrics_acc_and_acc_norm_by_characters():
    docs = [ChoiceDoc("q", ("a", "bbbb"), 1), ChoiceDoc("q", ("x", "y"), 0), ChoiceDoc("q", ("yes", "no"), 1)]
    results = [(-2.0, False), (-4.0, False), (-1.0, False), (-1.0, False), (-4.5, False), (-2.5, False)]
    m = Task("t", "multiple_choice", docs).metrics(results)
    # doc 1: acc picks 'a' (wrong), acc_norm picks 'bbbb' (-1 per char); doc 2: a tie goes to the first; doc 3 right.
    assert m == {"acc": 2 / 3, "acc_norm": 1.0, "n": 3.0}


def test_rolling_metrics_are_lm_evals_weighted_perplexities():
    docs = [RollingDoc("a b", 2, 3), RollingDoc("c d e", 3, 5)]
    m = Task("w", "rolling", docs).metrics([-4.0, -6.0])
    assert m["word_perplexity"] == pytest.approx(math.exp(10 / 5))
    assert m["byte_perplexity"] == pytest.approx(math.exp(10 / 8))
    assert m["bits_per_byte"] == pytest.approx(10 / 8 / math.log(2))


@pytest.mark.parametrize("which", ["gpt2", "qwen3", "small"])
def test_token_bytes_add_up_to_the_utf8_bytes_of_the_text(which, gpt2_dir, qwen3_dir, small_tokenizer):
    import zstandard

    tokenizer = {
        "gpt2": lambda: load_tokenizer(gpt2_dir),
        "qwen3": lambda: load_tokenizer(qwen3_dir),
        "small": lambda: small_tokenizer,
    }[which]()
    raw = (
        zstandard.ZstdDecompressor()
        .stream_reader(SHAKESPEARE.open("rb"))
        .read(20000)
        .decode("utf-8", "ignore")
    )
    text = raw + " déjà vu — 戦場のヴァルキュリア 👧🐟 def f(x):\n\treturn x"
    lengths = token_byte_lengths(tokenizer)
    assert int(lengths[tokenizer.encode(text)].sum()) == len(text.encode("utf-8"))
    assert lengths[tokenizer.eos_id] == 0


def test_validation_sets_count_tokens_and_bytes(small_tokenizer):
    lengths = token_byte_lengths(small_tokenizer)
    ids = small_tokenizer.encode("To be, or not to be: that is the question.") + [small_tokenizer.eos_id]
    labels = torch.tensor([ids[1:] + [IGNORE]])
    vs = measure("s", [{"labels": labels}], lengths)
    text_bytes = len(small_tokenizer.decode(ids[1:-1]).encode())
    assert (vs.tokens, vs.bytes) == (len(ids) - 1, text_bytes)
    m = val_metrics(2.0, vs.tokens, vs.bytes)
    assert m["bpb"] == pytest.approx(2.0 * vs.tokens / math.log(2) / vs.bytes)
