"""Text in and out of `forge serve`: chat templates rendered exactly as transformers renders them, special
tokens encoded as such, and streamed text that never shows a broken character or a stop string."""

from __future__ import annotations

import pytest

from forge_lm.data.tokenizer import Tokenizer, load_tokenizer
from forge_lm.trainer.inference.engine import Generator
from forge_lm.trainer.serve.chat import Prompter, TemplateError
from forge_lm.trainer.serve.textstream import REPLACEMENT, TextStream

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a play."},
    {"role": "assistant", "content": "Hamlet."},
    {"role": "user", "content": 'Another, in JSON: {"play": ...}'},
]


def test_a_tokenizers_chat_template_renders_as_transformers_renders_it(qwen3_dir: str) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(qwen3_dir)
    prompter = Prompter(load_tokenizer(qwen3_dir), qwen3_dir)
    assert prompter.has_own_template and qwen3_dir in prompter.template_origin
    for messages in (CHAT, CHAT[1:2], CHAT[:2]):
        want = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert prompter.render(messages) == want
        # Special-token strings are the special tokens: "<|im_start|>" is one id, as transformers has it.
        assert prompter.chat_ids(messages) == reference(want, add_special_tokens=False)["input_ids"]
    im_end = reference.convert_tokens_to_ids("<|im_end|>")
    assert im_end in prompter.eos_ids  # the end of a turn ends the reply


def test_the_default_template_and_a_template_file(tmp_path, gpt2_dir: str) -> None:
    tokenizer = load_tokenizer(gpt2_dir)
    prompter = Prompter(tokenizer, gpt2_dir)
    assert not prompter.has_own_template
    assert prompter.render(CHAT[:2]) == "System: You are terse.\n\nUser: Name a play.\n\nAssistant:"
    assert prompter.eos_ids == {tokenizer.eos_id}
    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}{% if m.role == 'assistant' and loop.first %}"
        "{{ raise_exception('the first message must not be the assistant') }}{% endif %}"
        "<{{ m.role }}>{{ m.content | tojson }}{% endfor %}{{ eos_token }}"
    )
    custom = Prompter(tokenizer, gpt2_dir, template_file=str(template))
    assert custom.render(CHAT[1:2]) == '<user>"Name a play."<|endoftext|>'
    with pytest.raises(TemplateError, match="must not be the assistant"):
        custom.render(CHAT[2:])


def test_templates_are_sandboxed(tmp_path, gpt2_dir: str) -> None:
    template = tmp_path / "evil.jinja"
    template.write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    prompter = Prompter(load_tokenizer(gpt2_dir), gpt2_dir, template_file=str(template))
    with pytest.raises(TemplateError):
        prompter.render(CHAT[1:2])


def _stream(tokenizer: Tokenizer, ids: list[int], stop=()) -> tuple[list[str], TextStream]:
    text = TextStream(tokenizer, stop)
    pieces = [text.push(t) for t in ids]
    if not text.stopped:
        pieces.append(text.finish())
    return pieces, text


def test_streamed_text_never_shows_half_a_character(gpt2_dir: str) -> None:
    tokenizer = load_tokenizer(gpt2_dir)
    sample = "naïve café — 你好，世界 🙂🎉 Ünïcödé ok"
    ids = tokenizer.encode(sample)
    assert any(REPLACEMENT in tokenizer.decode([t]) for t in ids)  # byte-level BPE splits characters
    pieces, _ = _stream(tokenizer, ids)
    assert "".join(pieces) == sample
    assert not any(REPLACEMENT in p for p in pieces)
    # A reply cut inside a character still ends with what the tokens spell (as Generator's text does).
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith(REPLACEMENT))
    pieces, _ = _stream(tokenizer, ids[:cut])
    assert "".join(pieces) == tokenizer.decode(ids[:cut])


def test_stop_strings_are_held_back_until_ruled_out_and_cut_as_the_generator_cuts(gpt2_dir: str) -> None:
    tokenizer = load_tokenizer(gpt2_dir)
    reply = "First line.\nSecond line.\n\nThird paragraph."
    ids = tokenizer.encode(reply)
    for stop in (["\n\n"], ["Third"], ["line.\nSec"], ["nowhere", "paragraph"], ["zzz"]):
        pieces, text = _stream(tokenizer, ids, stop)
        want = Generator._text(ids, [], stop, tokenizer)
        assert "".join(pieces) == want, stop
        assert text.stopped == (want != reply)
        # Nothing released ever begins a stop string that later completed.
        released = ""
        for piece in pieces:
            released += piece
            assert not any(s in released for s in stop)
    # The partial "\n" of "\n\n" waits: after "First line." + "\n" the newline is not yet out.
    text = TextStream(tokenizer, ["\n\n"])
    out = "".join(text.push(t) for t in tokenizer.encode("First line.\n"))
    assert out == "First line."
    assert text.push(tokenizer.encode("Second")[0]) == "\nSecond"
