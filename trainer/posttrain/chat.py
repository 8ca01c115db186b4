"""Chat templates: conversations rendered to text and token ids, with the mask of the tokens to learn.

A chat template is Jinja, as in Hugging Face's `tokenizer_config.json` (`chat_template`). It is rendered
the way `transformers.apply_chat_template` renders it: a sandboxed, immutable Jinja environment
(`trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, a JSON `tojson`) with the
`{% generation %}...{% endgeneration %}` block that marks what the assistant says. The rendered text is
tokenized with special tokens recognised and without added BOS/EOS, and a token is an assistant token
when it overlaps a generation block, exactly as transformers' `return_assistant_tokens_mask`, so our
label masks equal TRL's `assistant_only_loss` masks token for token (tests/unit/test_posttrain_trl.py).

A tokenizer without a template (the quickstart's byte-level BPE) gets `DEFAULT_TEMPLATE`, ChatML, and its
two special tokens `<|im_start|>` and `<|im_end|>` (`chat_tokenizer`); `grow_vocab` then gives the model
embedding and output rows for them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Optional

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken

from forge_lm.data.report import DataError
from forge_lm.data.tokenizer import Tokenizer, load_tokenizer

# ChatML with the assistant's words (and its end-of-turn token, so the model learns to stop) inside a
# generation block. Rendering the prompt alone (add_generation_prompt) gives a prefix of the whole chat.
DEFAULT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
DEFAULT_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")
END_OF_TURN = "<|im_end|>"
"""The default template's end of an assistant turn: where generation stops."""

ROLES = ("system", "user", "assistant")
LOSS_ON = ("assistant", "completion", "all")


class TemplateError(ValueError):
    """A chat template that does not compile or does not render a conversation."""


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


class _GenerationTracker(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body and records where it lies in the output."""

    tags = {"generation"}

    def __init__(self, environment: jinja2.Environment) -> None:
        super().__init__(environment)
        environment.extend(track_generation=self.track)
        self._tracking: ContextVar[Optional[tuple[list[str], list[tuple[int, int]]]]] = ContextVar(
            "generation_tracking", default=None
        )

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation", []), [], [], body).set_lineno(lineno)

    def _generation(self, caller: Any) -> str:
        text = caller()
        tracking = self._tracking.get()
        if tracking is not None:
            blocks, spans = tracking
            start = len("".join(blocks))
            spans.append((start, start + len(text)))
        return text

    @contextmanager
    def track(self, blocks: list[str], spans: list[tuple[int, int]]) -> Iterator[None]:
        token = self._tracking.set((blocks, spans))
        try:
            yield
        finally:
            self._tracking.reset(token)


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """A compiled chat template. Templates are data: the sandbox lets them compute strings, never run code."""

    def __init__(self, source: str, special_tokens: Optional[dict[str, str]] = None) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        """bos_token / eos_token, visible to the template as transformers passes them."""
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTracker, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"the chat template does not compile (line {e.lineno}: {e.message})") from e

    @property
    def has_generation_blocks(self) -> bool:
        return "generation" in self.source and "endgeneration" in self.source

    def render(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """The conversation as text, and the character spans of its generation blocks."""
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        try:
            with self._template.environment.track_generation(blocks, spans):  # type: ignore[attr-defined]
                for block in self._template.generate(
                    messages=[dict(m) for m in messages],
                    add_generation_prompt=add_generation_prompt,
                    **self.special_tokens,
                ):
                    blocks.append(block)
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template failed to render ({e})") from e
        return "".join(blocks), spans


# ---------------------------------------------------------------------------------------------------------
# The chat tokenizer
# ---------------------------------------------------------------------------------------------------------


class ChatTokenizer(Tokenizer):
    """A `Tokenizer` that reads chat special tokens as such (as transformers does with a chat template),
    with its chat template and the token that ends an assistant turn. It is a Tokenizer everywhere one is
    used (evaluation, samples, export); `save` adds the template to tokenizer_config.json."""

    def __init__(self, base: Tokenizer, template: ChatTemplate, end_of_turn_id: int) -> None:
        super().__init__(
            base.backend,
            eos_token=base.eos_token,
            bos_token=base.bos_token,
            split_special_tokens=False,
            add_bos=base.add_bos,
            add_eos=base.add_eos,
            policy_notes=base.policy_notes,
        )
        self.template = template
        self.end_of_turn_id = end_of_turn_id
        """The token that ends an assistant turn: generation stops there."""

    @property
    def chat_template(self) -> str:
        return self.template.source

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["template"] = (
            self.template.source,
            self.template.special_tokens,
        )  # compiled Jinja does not pickle
        return state

    def __setstate__(self, state: dict) -> None:
        source, specials = state["template"]
        super().__setstate__({**state, "template": None})
        self.template = ChatTemplate(source, specials)

    def encode_chat(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets of rendered chat text (special tokens recognised, none added)."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def save(self, out_dir: str, model_max_length: Optional[int] = None) -> None:
        """The tokenizer's files with `chat_template` in tokenizer_config.json (what transformers reads)."""
        super().save(out_dir, model_max_length)
        add_chat_template(out_dir, self.template.source)


def add_chat_template(out_dir: str, template: str) -> None:
    """Put `template` into out_dir/tokenizer_config.json as `chat_template`."""
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["chat_template"] = template
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def read_chat_template(path: str) -> Optional[str]:
    """The `chat_template` of a tokenizer folder's tokenizer_config.json (or its chat_template.jinja)."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    jinja_file = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    config_file = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file, encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    if isinstance(template, list):  # named variants: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def chat_tokenizer(path: str, template: Optional[str] = None) -> ChatTokenizer:
    """The chat tokenizer of the tokenizer at `path`.

    template: Jinja source, or a file holding it; None takes the tokenizer's own (tokenizer_config.json)
    or, if it has none, `DEFAULT_TEMPLATE`, adding `<|im_start|>` and `<|im_end|>` as special tokens when
    the vocabulary lacks them (new ids after the existing ones: grow the model with `grow_vocab`).
    Special-token strings are read as special tokens, as transformers does with a chat template.
    """
    base = load_tokenizer(path, split_special_tokens=False)
    if template is not None and os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            template = f.read()
    source = template or read_chat_template(path)
    backend = base.backend
    if source is None:
        source = DEFAULT_TEMPLATE
        missing = [t for t in DEFAULT_SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    specials = {"eos_token": base.eos_token, **({"bos_token": base.bos_token} if base.bos_token else {})}
    chat = ChatTemplate(source, specials)
    end = backend.token_to_id(END_OF_TURN)
    return ChatTokenizer(base, chat, end if end is not None else base.eos_id)


# ---------------------------------------------------------------------------------------------------------
# Conversations -> ids and loss masks
# ---------------------------------------------------------------------------------------------------------


def assistant_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """1 for every token that overlaps a generation span (transformers' return_assistant_tokens_mask)."""
    mask = np.zeros(len(offsets), dtype=np.int8)
    s = 0
    for i, (start, end) in enumerate(offsets):
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        if end > spans[s][0]:
            mask[i] = 1
    return mask


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_messages(
    chat: ChatTokenizer, messages: Sequence[dict[str, Any]], loss_on: str
) -> tuple[list[int], np.ndarray]:
    """Ids of a whole conversation and the mask of the tokens in the loss.

    loss_on: 'assistant' (every assistant turn: the template's generation blocks), 'all' (every token).
    """
    text, spans = chat.template.render(messages)
    ids, offsets = chat.encode_chat(text)
    if loss_on == "all":
        return ids, np.ones(len(ids), dtype=np.int8)
    if not chat.template.has_generation_blocks:
        raise TemplateError(
            "the chat template marks no assistant text with {% generation %}: use posttrain.loss_on=all, or a "
            "template with generation blocks (the default one has them)"
        )
    return ids, assistant_mask(offsets, spans)


def tokenize_prompt_completion(
    chat: ChatTokenizer, prompt: Sequence[dict[str, Any]], completion: Sequence[dict[str, Any]], loss_on: str
) -> tuple[list[int], np.ndarray, int]:
    """Ids of prompt + completion, the loss mask and where the completion starts.

    As TRL does: the prompt rendered with the generation prompt, the whole rendered without it, and the
    completion starting where the two token sequences part. loss_on 'completion' (or 'assistant') learns
    the completion only, 'all' everything.
    """
    prompt_ids, _ = chat.encode_chat(chat.template.render(prompt, add_generation_prompt=True)[0])
    text, _ = chat.template.render([*prompt, *completion])
    ids, _ = chat.encode_chat(text)
    start = common_prefix_length(prompt_ids, ids)
    mask = np.ones(len(ids), dtype=np.int8)
    if loss_on != "all":
        mask[:start] = 0
    return ids, mask, start


# ---------------------------------------------------------------------------------------------------------
# Growing the model for new tokens
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def grow_vocab(model: torch.nn.Module, vocab_size: int) -> int:
    """Give a `Decoder` at least `vocab_size` embedding (and output) rows; returns how many were added.

    The vocabulary is padded to `model.cfg.pad_vocab_to` as at build time. New rows start at the mean of the
    existing rows (a new token then begins as an average token, neither silent nor dominant); the rows of
    padding ids beyond the tokenizer are included in that mean, as they are real (trained-to-be-rare) rows.
    """
    cfg = model.cfg
    if cfg.vocab_size >= vocab_size:
        return 0
    m = cfg.pad_vocab_to
    new_size = m * ((vocab_size + m - 1) // m)
    added = new_size - cfg.vocab_size

    def grown(weight: torch.Tensor) -> torch.nn.Parameter:
        mean = weight.mean(dim=0, keepdim=True)
        return torch.nn.Parameter(torch.cat([weight, mean.expand(added, -1)], dim=0))

    model.tok_embeddings.weight = grown(model.tok_embeddings.weight)
    model.tok_embeddings.num_embeddings = new_size
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    else:
        model.output.weight = grown(model.output.weight)
    model.output.out_features = new_size
    cfg.vocab_size = new_size
    return added


def validate_messages(messages: Any) -> Optional[str]:
    """Why `messages` is not a usable conversation (None: it is)."""
    if not isinstance(messages, list) or not messages:
        return "'messages' is not a non-empty list"
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            return f"message {i} is not an object with string 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"message {i} has role {m['role']!r}, not one of {', '.join(ROLES)}"
    if not any(m["role"] == "assistant" for m in messages):
        return "the conversation has no assistant turn"
    return None


__all__ = [
    "DEFAULT_TEMPLATE",
    "ChatTemplate",
    "ChatTokenizer",
    "DataError",
    "TemplateError",
    "add_chat_template",
    "assistant_mask",
    "chat_tokenizer",
    "grow_vocab",
    "read_chat_template",
    "tokenize_messages",
    "tokenize_prompt_completion",
    "validate_messages",
]
