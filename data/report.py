"""Accounting of the input: every record read is either a kept document or skipped for a named reason.

Silently dropped data is only noticed weeks later in a loss curve, so the readers in `forge_lm.data.sources` report
every record they cannot use to an `InputReport`: it counts skips per reason, remembers the first few
`file:line` locations of each, and in strict mode turns the first real error into a `DataError` that names
`file:line`. Its invariant, checked by `check_totals`, is that nothing goes missing:

    records == documents + sum(skipped.values())

A *record* is one unit of input: a JSON line (blank lines included), a parquet or dataset row, a text
file (or one line / paragraph of it), or a file that could not be opened or read to its end.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# Reasons a record is skipped, and what the user should do about them.
ERROR_REASONS = {
    "malformed_json": "fix or remove the line; each line must hold exactly one JSON object",
    "invalid_utf8": "re-encode the file as UTF-8, or leave it out with the source's `exclude`",
    "not_an_object": "each line must hold one JSON object with the text in the source's `text_field`",
    "missing_field": "set `text_field` of the source to the field holding the text",
    "not_a_string": "fix the record, or point `text_field` of the source at a text field",
    "unreadable_file": "the file is truncated or not in the format its name says; documents before the damage are kept",
    "vanished_file": "the file was listed at the start but was gone when it was opened; restore it or rerun",
}
# Skips that are the configuration doing its job, not bad input: never fatal, even in strict mode.
FILTER_REASONS = {
    "empty": "empty text (blank line, empty field or empty file)",
    "too_short": "fewer characters than the source's `min_chars`",
    "too_long": "more characters than the source's `max_chars`",
}
REASONS = {**ERROR_REASONS, **FILTER_REASONS}


class DataError(ValueError):
    """The input data (or a file derived from it) is unusable. The message names where and what to do."""


@dataclass
class InputReport:
    """Counts of what the readers kept and skipped, with the first few locations of each kind of skip."""

    strict: bool = False
    """Raise a `DataError` at the first record skipped for an ERROR_REASONS reason (filters never raise)."""
    max_examples: int = 5
    """Locations remembered per reason."""
    records: int = 0
    """Input records seen (see the module docstring)."""
    documents: int = 0
    """Records kept as documents."""
    characters: int = 0
    """Characters of the kept documents."""
    skipped: Counter = field(default_factory=Counter)
    """reason -> records skipped for it."""
    examples: dict[str, list[str]] = field(default_factory=dict)
    """reason -> the first `max_examples` locations ('file:line: detail')."""
    documents_per_source: Counter = field(default_factory=Counter)
    """source name -> documents kept."""

    def keep(self, source: str, text: str) -> None:
        self.records += 1
        self.documents += 1
        self.characters += len(text)
        self.documents_per_source[source] += 1

    def skip(self, reason: str, where: str, detail: str = "", records: int = 1) -> None:
        """Count `records` records at `where` ('file:line') skipped for `reason`; raise if strict and an error."""
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}: use one of {sorted(REASONS)}")
        if self.strict and reason in ERROR_REASONS:
            raise DataError(f"{where}: {detail or reason.replace('_', ' ')}: {ERROR_REASONS[reason]}.")
        self.records += records
        self.skipped[reason] += records
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(f"{where}: {detail}" if detail else where)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def check_totals(self) -> None:
        """The invariant: every record is kept or counted as skipped."""
        if self.records != self.documents + self.num_skipped:
            raise AssertionError(
                f"input accounting is off: {self.records} records != {self.documents} documents + "
                f"{self.num_skipped} skipped. This is a bug in data.sources."
            )

    def merge(self, other: InputReport) -> None:
        """Add the counts of `other` (say, another source) to this report."""
        self.records += other.records
        self.documents += other.documents
        self.characters += other.characters
        self.skipped.update(other.skipped)
        self.documents_per_source.update(other.documents_per_source)
        for reason, locations in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(locations[: self.max_examples - len(mine)])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, in a fixed key order (stored in manifests)."""
        return {
            "records": self.records,
            "documents": self.documents,
            "characters": self.characters,
            "skipped": {r: self.skipped[r] for r in REASONS if self.skipped[r]},
            "examples": {r: list(self.examples[r]) for r in REASONS if r in self.examples},
            "documents_per_source": dict(sorted(self.documents_per_source.items())),
        }

    def summary(self) -> str:
        """A few human-readable lines: totals, then one line per skip reason with its first locations."""
        lines = [
            f"input: {self.records:,} records -> {self.documents:,} documents kept "
            f"({self.characters:,} characters), {self.num_skipped:,} skipped"
        ]
        for reason in REASONS:
            if self.skipped[reason]:
                first = "; ".join(self.examples.get(reason, []))
                lines.append(
                    f"  skipped {self.skipped[reason]:,} x {reason} ({REASONS[reason]}); first: {first}"
                )
        return "\n".join(lines)
