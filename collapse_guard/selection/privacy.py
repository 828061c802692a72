"""Drop samples that leak the real training data: verbatim copies and PII.

A model trained on its own samples re-learns whatever it memorized, so a sample that reproduces a
long span of the real data (or an email address, a phone number, a key) would be amplified round
after round. Two checks, each with its own reason:

- `verbatim_copy`: the sample shares a span of >= `min_copied_words` consecutive words (normalized)
  with the real texts. Default 32 words: memorization studies count a 50-token continuation as
  extractable (Carlini et al. 2021, 2023), and 50 BPE tokens are about 32-38 English words; counting
  words keeps the rule independent of the tokenizer. Common phrases are far shorter than that.
- `pii:<kind>`: emails, phone numbers, credit-card numbers (Luhn-checked), API keys (OpenAI-style
  `sk-...`, GitHub, Slack, Google), AWS access keys, private-key blocks and long hex / base64 secrets.

Example:

```python
>>> from collapse_guard.selection import PrivacyFilter
>>> f = PrivacyFilter()
>>> f(["Write to ann.lee@example.org today.", "Use key sk-abcdefghijklmnopqrstuvwxyz123456.", "Fine."])["text"][:]
['Fine.']
>>> f.report["reasons"]
{'pii:api_key': 1, 'pii:email': 1}

```
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from collapse_guard.selection.base import Selector
from collapse_guard.selection.dedup import normalize_words


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum that every payment card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _has_card(text: str) -> bool:
    for match in _CARD.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_valid(digits):
            return True
    return False


def _has_b64_secret(text: str) -> bool:
    # a long run of base64 characters that mixes cases and digits; plain words and numbers never do
    return any(
        re.search(r"[a-z]", m) and re.search(r"[A-Z]", m) and re.search(r"\d", m) for m in _B64.findall(text)
    )


_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_B64 = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/]{40,}={0,2}(?![A-Za-z0-9+/=_-])")

# (reason, pattern) in the order they are checked; the first match names the reason.
PII_PATTERNS: list[tuple[str, re.Pattern | Any]] = [
    ("pii:private_key", re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")),
    ("pii:aws_key", re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b")),
    ("pii:api_key", re.compile(
        r"\b(?:sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{36,}|xox[baprs]-[A-Za-z0-9-]{10,}"
        r"|AIza[0-9A-Za-z_-]{35}|hf_[A-Za-z0-9]{30,})")),
    ("pii:email", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")),
    ("pii:credit_card", _has_card),
    ("pii:phone", re.compile(
        r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?![\w])"
        r"|(?<![\w+])\+\d{1,3}(?:[\s.-]?\d{2,4}){3,4}(?!\w)")),
    ("pii:secret", re.compile(r"(?<![0-9A-Fa-f])[0-9a-fA-F]{32,}(?![0-9A-Fa-f])")),
    ("pii:secret", _has_b64_secret),
]


def find_pii(text: str, patterns: list[tuple[str, Any]] | None = None) -> str | None:
    """The reason of the first PII pattern found in `text`, or None."""
    for reason, pattern in patterns if patterns is not None else PII_PATTERNS:
        found = pattern(text) if callable(pattern) and not isinstance(pattern, re.Pattern) else pattern.search(text)
        if found:
            return reason
    return None


class PrivacyFilter(Selector):
    """Drops samples that copy >= `min_copied_words` consecutive words of `real_texts`, or contain PII.

    Args:
        real_texts: the real training data to protect (optional; without it only PII is checked).
        min_copied_words: length, in normalized words, of a verbatim span that counts as a copy.
        pii: check PII patterns.
        patterns: `(reason, compiled regex or callable)` pairs replacing `PII_PATTERNS`.
        target: `"both"` by default (a leaked span in a Magpie instruction counts too).
        **kwargs: further `Selector` options.
    """

    def __init__(
        self,
        real_texts: Iterable[str] | None = None,
        min_copied_words: int = 32,
        pii: bool = True,
        patterns: list[tuple[str, Any]] | None = None,
        **kwargs: Any,
    ):
        kwargs.setdefault("name", "privacy")
        kwargs.setdefault("target", "both")
        kwargs.setdefault("batch_size", 4096)
        super().__init__(**kwargs)
        if isinstance(real_texts, str):
            raise TypeError("real_texts must be a list of strings, got a single string; wrap it in a list.")
        if isinstance(min_copied_words, bool) or not isinstance(min_copied_words, int) or min_copied_words < 1:
            raise ValueError(f"min_copied_words must be a positive integer, got {min_copied_words!r}. Default: 32.")
        if real_texts is None and not pii:
            raise ValueError("PrivacyFilter with real_texts=None and pii=False would check nothing.")
        self.n = min_copied_words
        self.pii = pii
        self.patterns = patterns
        # Every n-word window of the real data: a sample copies >= n words iff it shares one of them.
        self._windows: set[int] = set()
        for text in real_texts or ():
            self._windows.update(self._hashes(normalize_words(text)))

    def _hashes(self, words: list[str]) -> set[int]:
        return {hash(tuple(words[i : i + self.n])) for i in range(len(words) - self.n + 1)}

    def keep(self, batch: dict[str, list]) -> list[str | None]:
        reasons: list[str | None] = []
        for text in self.texts(batch):
            reason = None
            if self._windows and not self._windows.isdisjoint(self._hashes(normalize_words(text))):
                reason = "verbatim_copy"
            elif self.pii:
                reason = find_pii(text, self.patterns)
            reasons.append(reason)
        return reasons
