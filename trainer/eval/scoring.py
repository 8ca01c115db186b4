"""Log-likelihoods of text under a model, by lm-evaluation-harness's rules, in batches.

The rules (lm_eval's `TemplateLM` and `HFLM`), which decide the numbers as much as the model does:

- Context / continuation split: trailing whitespace of the context moves to the front of the
  continuation; the joined string is encoded once and the continuation is what follows the context's
  own encoding: `encode(ctx + cont)[len(encode(ctx)):]`. So a word keeps the token it gets after a space.
- An empty context becomes the prefix token (BOS, else EOS) -- unless the continuation already starts
  with it, in which case its first token is the context.
- Too long: `(ctx + cont)[-(max_length + 1):][:-1]` is fed (left-truncated), and the log-probabilities
  of the continuation's tokens are summed. `is_greedy`: every continuation token is the argmax.
- Rolling log-likelihood (perplexity of a whole text): the tokens are cut into disjoint windows of at
  most `max_length` predictions; the first is conditioned on the prefix token alone, each later one
  on as many preceding tokens as fit (lm_eval's get_rolling_token_windows with context_len=1, made
  disjoint). Every token is predicted exactly once.

Batching is ours (it never changes a value): requests are sorted longest first, right-padded, and
scored one forward pass per batch through a `TokenScorer` (trainer.eval.scorers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from forge_lm.data.tokenizer import Tokenizer
from forge_lm.trainer.eval.scorers import IGNORE, TokenScorer
from forge_lm.trainer.eval.tasks import LoglikelihoodRequest, Request, RollingRequest


@dataclass(frozen=True)
class TokenRequest:
    """A request in tokens: the continuation's log-probability given the context."""

    context: list[int]
    continuation: list[int]


class TextEncoder:
    """Text -> ids the way the model saw documents in training, plus lm_eval's prefix token.

    A tokenizer whose documents start with BOS (Llama's) gets BOS in front of every encoded context, as
    `transformers` adds it for lm_eval's HFLM; others (GPT-2, Qwen, our trained BPE) get nothing added.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.bos = tokenizer.document_bos_id
        # lm_eval's prefix_token_id: BOS if the tokenizer has one, else EOS.
        self.prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        return [self.bos, *ids] if self.bos is not None else ids

    def encode_plain(self, text: str) -> list[int]:
        """Without any added token (lm_eval's add_special_tokens=False)."""
        return self.tokenizer.encode(text)


def split_pair(encoder: TextEncoder, context: str, continuation: str) -> TokenRequest:
    """The tokens of a (context, continuation) request, by lm_eval's rules (see the module docstring)."""
    if context == "":
        cont = encoder.encode_plain(continuation)
        if cont and cont[0] == encoder.prefix_id:
            return TokenRequest(cont[:1], cont[1:])
        return TokenRequest([encoder.prefix_id], cont)
    stripped = context.rstrip()
    if len(stripped) < len(context):
        continuation = context[len(stripped) :] + continuation
        context = stripped
    context_ids = encoder.encode(context)
    whole = encoder.encode(context + continuation)
    return TokenRequest(context_ids, whole[len(context_ids) :])


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_length: int) -> list[TokenRequest]:
    """Disjoint windows covering `tokens`, each predicting at most `max_length` of them (see the docstring)."""
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [TokenRequest([prefix_id], tokens[:first])]
    done = first
    while done < len(tokens):
        end = done + min(len(tokens) - done, max_length)
        # Context: the tokens just before the window, so context + window fill max_length + 1 tokens.
        windows.append(TokenRequest(tokens[max(end - max_length - 1, 0) : done], tokens[done:end]))
        done = end
    return windows


def score_tokens(
    requests: Sequence[TokenRequest],
    scorer: TokenScorer,
    max_length: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    greedy: bool = False,
) -> list[tuple[float, bool]]:
    """(sum of the continuation's log-probabilities, is_greedy) per request, in request order.

    Without `greedy` the scorer may skip the argmax (is_greedy is then reported False).
    """
    for r in requests:
        if not r.continuation:
            raise ValueError(
                f"a request has an empty continuation after tokenization (context ends {r.context[-5:]}): "
                "lm_eval refuses these too; check the task's targets."
            )
        if len(r.continuation) > max_length:
            raise ValueError(
                f"a continuation of {len(r.continuation)} tokens does not fit the model's {max_length}-token "
                "context: raise eval.max_length (up to model.max_seq_len) or shorten the target."
            )
    # Longest first: the first request of a batch sets its padded length (lm_eval's order, too).
    order = sorted(
        range(len(requests)), key=lambda i: -(len(requests[i].context) + len(requests[i].continuation))
    )
    results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
    for start in range(0, len(order), batch_size):
        batch = [requests[i] for i in order[start : start + batch_size]]
        for i, result in zip(
            order[start : start + batch_size], _score_batch(batch, scorer, max_length, device, greedy)
        ):
            results[i] = result
    return results  # type: ignore[return-value]


def _score_batch(
    batch: list[TokenRequest], scorer: TokenScorer, max_length: int, device: torch.device | str, greedy: bool
) -> list[tuple[float, bool]]:
    rows = [(r.context + r.continuation)[-(max_length + 1) :] for r in batch]
    width = max(len(row) for row in rows) - 1
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for b, (row, r) in enumerate(zip(rows, batch)):
        n = len(row) - 1
        input_ids[b, :n] = torch.tensor(row[:-1])
        # Only the continuation's positions are scored: the last len(continuation) of the row.
        k = len(r.continuation)
        targets[b, n - k : n] = torch.tensor(row[-k:])
    logprobs, is_argmax = scorer(input_ids.to(device), targets.to(device), greedy)
    scored = targets != IGNORE
    sums = (logprobs.float().cpu() * scored).sum(dim=1)
    if is_argmax is None:
        all_greedy = [False] * len(batch)
    else:
        all_greedy = (is_argmax.cpu() | ~scored).all(dim=1).tolist()
    return [(float(s), bool(g)) for s, g in zip(sums.tolist(), all_greedy)]


def run_requests(
    requests: Sequence[Request],
    encoder: TextEncoder,
    scorer: TokenScorer,
    max_length: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    greedy: bool = False,
) -> list:
    """Results of task requests, in order: (loglikelihood, is_greedy) for LoglikelihoodRequest, the summed
    log-likelihood (a float) for RollingRequest. All windows of all rolling requests share the batches."""
    token_requests: list[TokenRequest] = []
    owners: list[int] = []  # which request each token request belongs to
    for i, req in enumerate(requests):
        if isinstance(req, LoglikelihoodRequest):
            token_requests.append(split_pair(encoder, req.context, req.continuation))
            owners.append(i)
        elif isinstance(req, RollingRequest):
            windows = rolling_windows(encoder.encode_plain(req.text), encoder.prefix_id, max_length)
            token_requests.extend(windows)
            owners.extend([i] * len(windows))
        else:
            raise TypeError(f"not a request: {req!r}")
    scores = score_tokens(token_requests, scorer, max_length, batch_size, device, greedy)
    results: list = [0.0 if isinstance(r, RollingRequest) else None for r in requests]
    for owner, (ll, is_greedy) in zip(owners, scores):
        if isinstance(requests[owner], RollingRequest):
            results[owner] += ll
        else:
            results[owner] = (ll, is_greedy)
    return results
