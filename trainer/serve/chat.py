"""From a request to prompt token ids: the chat template, the special tokens, the ids that end a reply.

Chat messages are rendered with the tokenizer's own Jinja chat template when it ships one (`chat_template`
in tokenizer_config.json, or a chat_template.jinja file beside it; a model post-trained here carries
the template it was trained with), through trainer/posttrain/chat.py's `ChatTemplate`: rendered the way
`transformers`' `apply_chat_template(messages, add_generation_prompt=True)` renders it, in Jinja's
sandbox (templates are data from a file, never code with access to Python). A model without a template
(one pre-trained here) gets DEFAULT_TEMPLATE, plain text in the style of a play:

    System: You are terse.

    User: Hello

    Assistant:

Prompts are encoded with special tokens recognised as such (a rendered "<|im_start|>" is one token), and
without any token added by the tokenizer itself: a template writes the BOS it wants. A plain completion
prompt gets the BOS the tokenizer frames documents with (Tokenizer.add_bos), as in training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import tokenizers

from forge_lm.data.tokenizer import CHAT_ONLY_TOKENS, Tokenizer
from forge_lm.trainer.posttrain.chat import ChatTemplate, TemplateError, read_chat_template

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message.role | capitalize }}: {{ message.content }}{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

__all__ = ["DEFAULT_TEMPLATE", "Prompter", "TemplateError"]


def _token_content(value: Any) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Prompter:
    """Renders chats, encodes prompts, and knows which generated ids end a reply."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        tokenizer_dir: Optional[str] = None,
        template_file: Optional[str] = None,
        model_dir: Optional[str] = None,
    ) -> None:
        self.tokenizer = tokenizer
        # A copy of the tokenizer that reads special-token strings as the special tokens (the training
        # tokenizer splits them as text, so that corpora cannot forge document separators).
        self._encoder = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
        self._encoder.encode_special_tokens = False
        config = _read_json(Path(tokenizer_dir) / "tokenizer_config.json") if tokenizer_dir else {}
        own = read_chat_template(tokenizer_dir) if tokenizer_dir else None
        if template_file is not None:
            source, self.template_origin = Path(template_file).read_text(encoding="utf-8"), template_file
        elif own is not None:
            source, self.template_origin = own, f"the tokenizer's ({tokenizer_dir})"
        else:
            source, self.template_origin = DEFAULT_TEMPLATE, "the default template (trainer/serve/chat.py)"
        self.has_own_template = source is not DEFAULT_TEMPLATE
        special = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = _token_content(config.get(name))
            if value is not None:
                special[name] = value
        self._template = ChatTemplate(source, {k: v for k, v in special.items() if v is not None})
        self.eos_ids = self._stop_ids(config, model_dir, source)

    def _stop_ids(self, config: dict, model_dir: Optional[str], template: str) -> frozenset[int]:
        """The tokenizer's EOS, its configured eos_token, the end-of-turn tokens its chat template writes
        (such as <|im_end|>: a chat reply ends there), and the eos_token_id(s) of a generation_config.json
        beside the model."""
        ids = {self.tokenizer.eos_id}
        configured = _token_content(config.get("eos_token"))
        for token in [configured, *(t for t in CHAT_ONLY_TOKENS if t in template)]:
            if token is not None and self._encoder.token_to_id(token) is not None:
                ids.add(self._encoder.token_to_id(token))
        if model_dir is not None:
            gen = _read_json(Path(model_dir) / "generation_config.json").get("eos_token_id")
            ids.update(i for i in (gen if isinstance(gen, list) else [gen]) if isinstance(i, int))
        return frozenset(ids)

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        """The conversation as the prompt text that asks for the assistant's next message."""
        return self._template.render(messages, add_generation_prompt=True)[0]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special-token strings read as the special tokens, nothing added."""
        return self._encoder.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A completion prompt: `encode`, after the BOS that starts every training document (if any). An
        empty prompt becomes that BOS, or the EOS that separates documents: a start of a new document."""
        start = (
            [self.tokenizer.bos_id] if self.tokenizer.add_bos and self.tokenizer.bos_id is not None else []
        )
        ids = start + self.encode(text)
        return ids or [self.tokenizer.eos_id]

    def chat_ids(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        return self.encode(self.render(messages)) or [self.tokenizer.eos_id]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e}): fix or delete it.") from e
    return data if isinstance(data, dict) else {}
