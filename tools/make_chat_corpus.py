"""Write data/corpora/chitchat.jsonl.zst: conversations of the chitchat-dataset package as chat `messages`.

    pip install chitchat-dataset==0.9.0 && python -m forge_lm.tools.make_chat_corpus

Each conversation of the BYU PCC lab's Chit-Chat Challenge (MIT License, see data/corpora/NOTICE.md) is two
people taking turns; a turn is one or more short messages of one person, joined here by newlines. The person
who speaks first becomes the `user`, the other the `assistant`. Conversations are kept in the package's order
(sorted by id), their first `--turns` turns, and only those with at least two turns; the first `--count`
are written, one JSON record per line: {"id", "messages": [{"role", "content"}, ...]}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import zstandard

OUT = Path(__file__).resolve().parent.parent / "data" / "corpora" / "chitchat.jsonl.zst"


def conversations(count: int, turns: int) -> list[dict]:
    import chitchat_dataset

    data = json.loads((Path(chitchat_dataset.__file__).parent / "dataset.json").read_text())
    out = []
    for conv_id in sorted(data):
        speakers: list[str] = []
        messages = []
        for turn in data[conv_id]["messages"][:turns]:
            text = "\n".join(m["text"].strip() for m in turn if m["text"].strip())
            if not text:
                continue
            sender = turn[0]["sender"]
            if sender not in speakers:
                speakers.append(sender)
            role = "user" if speakers.index(sender) == 0 else "assistant"
            messages.append({"role": role, "content": text})
        if len(messages) >= 2 and any(m["role"] == "assistant" for m in messages):
            out.append({"id": conv_id, "messages": messages})
        if len(out) == count:
            break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    lines = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations(args.count, args.turns))
    args.out.write_bytes(zstandard.ZstdCompressor(level=19).compress(lines.encode("utf-8")))
    print(f"wrote {args.out} ({lines.count(chr(10))} conversations, {args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
