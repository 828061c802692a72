"""Drop samples that leak the real training data: verbatim copies, personal data and secrets.

A model trained on its own samples re-learns whatever it memorized, so a sample that reproduces a
long span of the real data (or an email address, a phone number, a key) would be amplified round
after round. Two checks, each with its own reason:

- `verbatim_copy`: the sample shares a span of >= `min_copied_words` consecutive words (normalized)
  with the real texts. Default 32 words: memorization studies count a 50-token continuation as
  extractable (Carlini et al. 2021, 2023), and 50 BPE tokens are about 32-38 English words; counting
  words keeps the rule independent of the tokenizer. Common phrases are far shorter than that.
- `pii:<kind>`: personal data and secrets, see `PII_KINDS`. Each kind is a small detector with a
  format rule and, where the format alone is ambiguous, a checksum or a context word:

  - `pii:email`: RFC-like address with a Unicode local part / domain; `[at]`, `(at)` and
    `name at host dot com` forms; not `icon@2x.png`, `git@host:org/repo`, `pkg@1.2.3`.
  - `pii:phone`: `phonenumbers` (Google's libphonenumber) in 14 regions, valid numbers only; a
    national number also needs a trunk `0`, an `(area)` code, a valid North-American layout or a
    context word before it ("call", "tel", "mobile", "appelez", ...). Numbers with the reserved
    North-American area code 555 (fiction, examples) count in every layout, by the same rule.
  - `pii:credit_card`: 14-19 digits with a card-network prefix and the Luhn checksum.
  - `pii:iban`: country code, the country's length and the ISO 7064 mod-97 checksum.
  - `pii:us_ssn`: `AAA-GG-SSSS` with a valid area / group / serial; spaced or bare digits only after
    "SSN" / "social security".
  - `pii:uk_nino`: a UK National Insurance number with valid prefix letters.
  - `pii:ip_address`: public (globally routed) IPv4 / IPv6 addresses; not private or loopback ones,
    not dotted versions ("release 2.14.3.1").
  - `pii:date_of_birth`: a date after "date of birth", "DOB", "born (on)".
  - `pii:passport`: a 6-9 character number after "passport (no.)".
  - `pii:street_address`: house number + capitalised street name + street type ("742 Evergreen
    Terrace,"), French "12 Rue de ...", German "Lindenstraße 14".
  - `pii:private_key`: `-----BEGIN ... PRIVATE KEY-----` (PEM, OpenSSH, PGP blocks).
  - `pii:aws_key`: AWS access key ids (`AKIA...`, `ASIA...`) and `aws_secret_access_key = ...`.
  - `pii:api_key`: vendor tokens: OpenAI, Anthropic, GitHub (also fine-grained), GitLab, Slack (and
    webhooks), Stripe, Hugging Face, Google; with `detect-secrets` also npm, SendGrid, Twilio,
    Telegram, Azure, Discord, Mailchimp, PyPI, Square, Artifactory and IBM.
  - `pii:jwt`: JSON Web Tokens (`eyJ...eyJ...signature`).
  - `pii:credentials_in_url`: `scheme://user:password@host`.
  - `pii:password`: `password: value`, `pwd=value`, "the password is value", with a value that is
    not a placeholder (`********`, `<your password>`, `os.environ[...]`, `${VAR}`). A plain word
    counts when it is the whole value of a `password:` / `passwd=` field ("password: sunshine");
    in prose ("the password is correct", "Forgot your password: click here") it does not.
  - `pii:secret`: a value assigned to `api_key` / `secret` / `token` / ..., or a 32+ character
    mixed-case random-looking token (not a CamelCase identifier, not a data URI or digest).

  Look-alikes are kept on purpose: version strings, git SHA-1 / SHA-256 digests (hex alone is never a
  secret here, only after a `secret=`-like key), UUIDs, ISBN / EAN barcodes, file names with `@`,
  npm `pkg@version`, numeric tables, paths and long CamelCase identifiers.

Every detector runs in time linear in the text (no nested-quantifier regex; phonenumbers parses only
bounded number-like spans, at most `MAX_PHONE_CANDIDATES` = 200 of them per text): a 100k-character
adversarial string takes about a second. About 3-5 ms per news article or Wikipedia paragraph on a
busy 2-core machine (the previous regex-only filter: about 1 ms).

Precision and recall of every kind are measured on the labelled set in
`tests/data/privacy_labelled.jsonl` (see `privacy_scores` and `benchmarks/privacy.py`).

Which library where (measured, see the benchmark): `phonenumbers` beats any hand-written phone
regex (it knows every country's numbering plan, so `100 200 3000` is not a phone but `06 12 34 56 78`
is); `detect-secrets`' vendor plugins add the token formats we do not write rules for (its
high-entropy and keyword plugins are not used: they flag git hashes and need file context). Both
are optional (`pip install 'collapse-guard[privacy]'`); without them the phone rule falls back to a
regex for `+international` and North-American numbers and only the built-in vendor formats are
checked, with a one-time warning. Presidio is an optional extra backend (`presidio_detector`).

Example:

```python
>>> from collapse_guard.selection import PrivacyFilter
>>> f = PrivacyFilter()
>>> f(["Write to ann.lee@example.org today.", "Use key sk-abcdefghijklmnopqrstuvwxyz123456.",
...    "Add icon@2x.png; see commit a94a8fe5ccb19ba61c4c0873d391e987982fbbd3."])["text"][:]
['Add icon@2x.png; see commit a94a8fe5ccb19ba61c4c0873d391e987982fbbd3.']
>>> f.report["reasons"]
{'pii:api_key': 1, 'pii:email': 1}

```
"""

from __future__ import annotations

import importlib.util
import ipaddress
import math
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import cache, lru_cache
from typing import Any

from collapse_guard.selection.base import Selector
from collapse_guard.selection.dedup import normalize_words

Detector = Callable[[str], Any]

# ----- payment cards -------------------------------------------------------------------------------


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum that every payment card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){13,18}\d(?![\d-])")
# (first digits, allowed lengths) of the networks users paste: Visa, Mastercard, Amex, Discover,
# JCB, Diners, UnionPay, Maestro. A prefix check keeps Luhn-valid barcodes and ids out (1 in 10 pass Luhn).
_CARD_NETWORKS = re.compile(r"^(?:4\d{15}(?:\d{3})?|5[1-5]\d{14}|2(?:2[2-9]\d|[3-6]\d\d|7[01]\d|720)\d{12}"
                            r"|3[47]\d{13}|6(?:011|5\d\d|4[4-9]\d)\d{12}|35(?:2[89]|[3-8]\d)\d{12}"
                            r"|3(?:0[0-5]|[68]\d)\d{11}|62\d{14,17}|(?:50|5[6-9]|6\d)\d{10,17})$")


def _has_card(text: str) -> bool:
    for match in _CARD.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if _CARD_NETWORKS.match(digits) and len(set(digits)) > 1 and luhn_valid(digits):
            return True
    return False


# ----- bank accounts and national ids --------------------------------------------------------------
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AT": 20, "BE": 16, "BG": 22, "BR": 29, "CH": 21, "CY": 28, "CZ": 24, "DE": 22,
    "DK": 18, "EE": 20, "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GR": 27, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IS": 26, "IT": 27, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MT": 31, "NL": 18,
    "NO": 15, "PL": 28, "PT": 25, "RO": 24, "SA": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "TR": 26,
}
_IBAN = re.compile(r"\b([A-Z]{2})(\d{2})((?: ?[A-Z0-9]){11,30})\b")


def _has_iban(text: str) -> bool:
    for match in _IBAN.finditer(text):
        country = match.group(1)
        body = (match.group(1) + match.group(2) + match.group(3)).replace(" ", "")
        if _IBAN_LENGTHS.get(country, len(body)) != len(body):
            continue
        rearranged = body[4:] + body[:4]
        if int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1:  # ISO 7064 mod 97-10
            return True
    return False


_SSN_DASHED = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
_SSN_CONTEXT = re.compile(
    r"(?i)(?:\bssn|social\s+security(?:\s+(?:number|no\.?|#))?)\W{0,3}(?:\w+\W{1,3}){0,3}?"
    r"(?!000|666|9\d\d)(\d{3})[ -]?(?!00)(\d{2})[ -]?(?!0000)(\d{4})(?!\d)"
)


_SSN_HINT = re.compile(r"(?i)ssn|social\s+security")


def _has_ssn(text: str) -> bool:
    return bool(_SSN_DASHED.search(text) or (_SSN_HINT.search(text) and _SSN_CONTEXT.search(text)))


_NINO = re.compile(r"\b(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
                   r" ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")

# ----- network addresses ---------------------------------------------------------------------------
_IPV4 = re.compile(r"(?<![\w.])((?:\d{1,3}\.){3}\d{1,3})(?![\w.]*\d)")
_IPV6 = re.compile(r"(?<![\w:])((?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{1,4})(?![\w:])")
# A dotted quad after these words is a version ("release 2.14.3.1"), not an address.
_VERSION_WORDS = re.compile(r"(?i)(?:\b(?:v|ver|version|release|build|rev|revision|update|patch|"
                            r"firmware|chrome|firefox|edge|safari|windows|android|ios|python|node|torch|cuda"
                            r"|driver)\s*"
                            r"|[=<>~^]=?\s*|\bv)$")


def _public_ip(candidate: str) -> bool:
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return address.is_global and not address.is_multicast


def _has_ip(text: str) -> bool:
    for match in _IPV4.finditer(text):
        before = text[max(0, match.start() - 20): match.start()]
        if not _VERSION_WORDS.search(before) and _public_ip(match.group(1)):
            return True
    # "::A" (wiki indentation) parses as an address: ask for three groups, as real addresses have
    return any(_public_ip(m.group(1)) for m in _IPV6.finditer(text)
               if ("::" in m.group(1) or m.group(1).count(":") == 7)
               and sum(bool(g) for g in m.group(1).split(":")) >= 3)


# ----- emails --------------------------------------------------------------------------------------
_EMAIL = re.compile(r"(?<![\w.%+'-])([\w.%+'-]+)@((?:[^\W_](?:[\w-]*[^\W_])?\.)+([^\W\d_]{2,}))\b")
# "@2x.png", "@3x.webp": retina asset names, not addresses; "git@github.com:org/repo": an SSH remote.
_FILE_SUFFIXES = {"png", "jpg", "jpeg", "gif", "webp", "svg", "ico", "bmp", "tif", "tiff", "pdf", "js", "mjs",
                  "ts", "tsx", "jsx", "css", "scss", "html", "htm", "json", "yaml", "yml", "txt", "whl",
                  "zip", "gz", "tar", "lock", "git", "heic", "avif"}
# "ann [at] example [dot] com", "support(at)acme.io", "bob dot smith at gmail dot com": found from each
# "at" marker with bounded look-arounds, so the scan stays linear on any input
_AT_MARK = re.compile(r"(?i)\s*[\[({]\s*at\s*[\])}]\s*|\s+at\s+")
_DOT = r"(?:\s*[\[({]\s*dot\s*[\])}]\s*|\s+dot\s+|\.)"
_BRACKET_DOMAIN = re.compile(rf"(?i)[\w-]{{1,64}}(?:{_DOT}[\w-]{{1,64}}){{0,3}}{_DOT}[^\W\d_]{{2,}}\b")
_SPOKEN_DOMAIN = re.compile(r"(?i)([\w-]{1,64})(?:\s+dot\s+[\w-]{1,64}){0,3}\s+dot\s+"
                            r"(?:com|org|net|edu|gov|io|co|uk|de|fr|es|it|nl|jp|au|ca|info|me)\b")
_OBFUSCATED_HINT = re.compile(r"(?i)[\[({]\s*at\s*[\])}]|\bdot\b")
_NOT_A_DOMAIN_WORD = {"the", "a", "an", "this", "that", "my", "your", "our", "their", "his", "her", "its",
                      "least"}


def _has_email(text: str) -> bool:
    for match in _EMAIL.finditer(text):
        domain, tld = match.group(2), match.group(3).lower()
        if tld in _FILE_SUFFIXES or re.match(r"\d+(?:\.\d+)?x\.", domain):
            continue
        if re.match(r":[\w.~-]+/", text[match.end():]):  # git@github.com:org/repo.git
            continue
        return True
    if not _OBFUSCATED_HINT.search(text):  # no "[at]" / "(at)" / " dot ": no spelled-out address
        return False
    for mark in _AT_MARK.finditer(text):
        if not re.search(r"[\w+-]$", text[max(0, mark.start() - 1): mark.start()]):
            continue  # no local part right before the marker
        after = text[mark.end(): mark.end() + 300]
        if mark.group().strip().lower() != "at":  # [at] / (at) / {at}
            if _BRACKET_DOMAIN.match(after):
                return True
            continue
        spoken = _SPOKEN_DOMAIN.match(after)
        if spoken and spoken.group(1).lower() not in _NOT_A_DOMAIN_WORD:
            return True
    return False


# ----- phone numbers -------------------------------------------------------------------------------
PHONE_REGIONS = ("US", "GB", "FR", "DE", "AU", "JP", "IN", "BR", "CA", "ES", "IT", "NL", "CN", "MX")
# a bounded candidate span: phonenumbers runs on each span, never on a whole (possibly huge) text
_PHONE_CANDIDATE = re.compile(r"\+?\(?\d[\d\s().-]{5,23}\d\)?")
MAX_PHONE_CANDIDATES = 200  # a text with more number-like spans is a table: the rest are not parsed
_PHONE_CONTEXT = re.compile(
    r"(?i)(?:phone|tel\b|tel\.|telephone|call|ring|mobile|cell|fax|whats\s?app|sms|text\s+me|contact|dial|"
    r"hotline|number|appel|portable|téléphone|telefon|anrufen|rufen|ligue|llam|電話|携帯)[^\d\n]{0,25}$"
)
_NANP = re.compile(r"^(?:1[\s.-])?\(?\d{3}\)?[\s.-]\d{3}[\s.-]\d{4}$")
# 555 is the North-American area code reserved for fiction and examples: libphonenumber calls it
# invalid, so without this rule "(555) 123-4567" was a phone only because another region's plan
# happened to accept its digits, while "555-123-4567" and "+1 555 123 4567" were kept. A generated
# phone number is dropped whatever its area code (the filter cannot tell a template from a memorised
# number), so a 555 number counts as a valid North-American one in every layout, judged by the same
# `_phone_accepted` rule as any other (bare digits still need a context word).
_NANP_555 = re.compile(
    r"(?<![\w+])(?:\+1[\s.-]?|1[\s.-])?(?:\(555\)[\s.-]?|555[\s.-]?)\d{3}[\s.-]?\d{4}(?!\w)")
_PHONE_FALLBACK = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?![\w])"
    r"|(?<![\w+])\+\d{1,3}(?:[\s.-]?\d{2,4}){3,4}(?!\w)"
)


def _warn_missing(package: str, what: str) -> None:
    _warn_once(package, what)


@cache
def _warn_once(package: str, what: str) -> None:
    warnings.warn(f"PrivacyFilter: {package} is not installed, so {what}. Install it with "
                  f"`pip install 'collapse-guard[privacy]'` (or `pip install {package}`).", stacklevel=4)


def _phone_accepted(text: str, start: int, raw: str, regions_valid: set[str]) -> bool:
    if re.search(r"(?i)\b(?:isbn(?:-1[03])?|issn|doi|ean|upc)\W{0,3}$", text[max(0, start - 12): start]):
        return False
    if raw.startswith("+"):
        return True
    if _PHONE_CONTEXT.search(text[max(0, start - 40): start]):
        return True
    if not re.search(r"[\s().-]", raw):  # bare digits are ids, timestamps, counts, unless a context word
        return False
    if re.match(r"0\d|\(", raw):  # a trunk prefix or an (area code): how national numbers are written
        return True
    return bool(_NANP.match(raw)) and bool(regions_valid & {"US", "CA"})


def _has_phone(text: str, regions: Sequence[str] = PHONE_REGIONS) -> bool:
    if not _PHONE_CANDIDATE.search(text):
        return False
    if any(_phone_accepted(text, m.start(), m.group(), {"US", "CA"}) for m in _NANP_555.finditer(text)):
        return True
    if importlib.util.find_spec("phonenumbers") is None:
        _warn_missing("phonenumbers", "phone numbers are found by a regex for +international and "
                      "North-American formats only (national formats of other countries are missed)")
        return bool(_PHONE_FALLBACK.search(text))
    from phonenumbers import Leniency, PhoneNumberMatcher

    found: dict[tuple[int, str], set[str]] = {}
    for k, candidate in enumerate(_PHONE_CANDIDATE.finditer(text)):
        if k == MAX_PHONE_CANDIDATES:
            break
        # one character either side: phonenumbers refuses a number glued to letters ("Report05.02.2010")
        start = max(0, candidate.start() - 1)
        window = text[start: candidate.end() + 1]
        for region in regions:
            for match in PhoneNumberMatcher(window, region, leniency=Leniency.VALID):
                found.setdefault((start + match.start, match.raw_string), set()).add(region)
    return any(_phone_accepted(text, start, raw, valid) for (start, raw), valid in found.items())


# ----- personal details with a context word --------------------------------------------------------
_MONTHS = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|jun(?:e)?|jul(?:y)?|aug(?:ust)?|"
           r"sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)")
_DATE = (rf"(?:\d{{1,2}}[./-]\d{{1,2}}[./-](?:19|20)?\d{{2}}|(?:19|20)\d{{2}}[./-]\d{{1,2}}[./-]\d{{1,2}}"
         rf"|\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTHS}\.?,?\s+(?:19|20)\d{{2}}"
         rf"|{_MONTHS}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?"
         rf"\s+(?:19|20)\d{{2}})")
_DOB_HINT = re.compile(r"(?i)birth|\bd\.?o\.?b\b|\bborn\b|\bné|geboren")
_DOB = re.compile(rf"(?i)(?:date\s+of\s+birth|\bd\.?o\.?b\b\.?|\bborn(?:\s+on)?|birth\s*date|birthday|"
                  rf"\bné(?:e)?\s+le|geboren(?:\s+am)?)\W{{0,3}}(?:\w+\W{{1,3}}){{0,2}}?{_DATE}")
_PASSPORT = re.compile(r"(?i)(?:passport|reisepass|passeport|pasaporte)[\w\s.#:-]{0,16}?"
                       r"(?:no\.?|nr\.?|number|"
                       r"n°|#|:)\s*(?=[A-Z0-9]*\d[A-Z0-9]*\d[A-Z0-9]*\d[A-Z0-9]*\d)([A-Z0-9]{6,9})\b")
_PASSPORT_HINT = re.compile(r"(?i)passport|reisepass|passeport|pasaporte")
_STREET_TYPES = (r"(?:Street|St\.?|Avenue|Ave\.?|Road|Rd\.?|Boulevard|Blvd\.?|Lane|Ln\.?|Drive|Dr\.?|Terrace|"
                 r"Parkway|Pkwy\.?|Court|Ct\.?|Place|Pl\.?|Way|Close|Crescent|Square|Highway|Hwy\.?)")
_STREET = re.compile(
    rf"\b\d{{1,5}}[A-Z]?,?\s+(?:[A-Z][\w'.-]*\s+){{1,4}}{_STREET_TYPES}(?=\s*,|\.?\s*$|\.\s)"
    r"|\b\d{1,4}(?:\s?(?:bis|ter))?,?\s+"
    r"(?:[Rr]ue|[Aa]venue|[Bb]oulevard|[Pp]lace|[Cc]hemin|[Aa]llée|[Ii]mpasse|[Qq]uai)"
    r"\s+(?:de\s+la\s+|de\s+l'|de\s+|du\s+|des\s+)?[A-ZÀ-Ý]"
    r"|\b[A-ZÄÖÜ][a-zäöüß]+(?:straße|strasse|weg|platz|allee|gasse)\s+\d{1,4}[a-z]?\b"
)

# ----- secrets -----------------------------------------------------------------------------------
_PRIVATE_KEY = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
_AWS_KEY = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|APKA)[0-9A-Z]{16}\b"
                      r"|(?i:aws_?secret_?access_?key)[\"']?\s*[:=]\s*[\"']?"
                      r"[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])")
_API_KEY = re.compile(
    r"\b(?:sk-(?:proj-|ant-(?:api\d\d-)?|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"  # OpenAI, Anthropic
    r"|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{60,}"  # GitHub classic / fine-grained
    r"|glpat-[A-Za-z0-9_-]{20,}"  # GitLab
    r"|xox[baprs]-[A-Za-z0-9-]{10,}"  # Slack
    r"|(?:sk|rk)_live_[A-Za-z0-9]{20,}"  # Stripe
    r"|AIza[0-9A-Za-z_-]{35}"  # Google
    r"|hf_[A-Za-z0-9]{30,})"  # Hugging Face
    r"|https://hooks\.slack\.com/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]+"
)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
_CREDENTIALS_URL = re.compile(r"\b[a-z][a-z0-9+.-]{1,20}://[^\s:/@]{0,64}:([^\s:/@]{3,128})@[\w.-]+")
_PLACEHOLDER = re.compile(r"(?i)^(?:\*+|x{3,}|\.{3}|[<\[{(].*|\$\{.*|\{\{.*|%\(.*|\$[A-Z_]+"
                          r"|none|null|nil|true|false|changeme|required|optional|string|your[_-].*|.*_here"
                          r"|example|redacted|hidden|secret|password|\w+\.(?:environ|getenv|get)\b.*"
                          r"|(?:os|process)\.env.*|getenv.*|env\(.*)$")
# the look-behind is case-sensitive: "PGPASSWORD=" is an assignment, "mypassword" is a word
_PASSWORD = re.compile(
    r"(?<![a-z])(?i:password|passwd|passphrase|pwd|mot\s+de\s+passe|passwort|contraseña|senha)"
    r"[\"']?\s*(?:(?P<sep>[:=])|\s(?i:is|est|ist|es|é)\s)\s*(?P<q>[\"']?)(?P<v>[^\s\"',;]{4,})"
)
# What may follow a one-word value for it to be the whole field: the end of the line (after a full
# stop or a closing bracket), a field separator, or the next `key:` / `key=`. "password: sunshine" and
# "user: bob, passwd: dragon" end there; "Forgot your password: click here" goes on, so it is prose.
_FIELD_END = re.compile(r"[.!)\]}>]?[ \t]*(?:$|\n|[,;|&][ \t]*|[ \t]+[\w.-]+[\"']?[ \t]*[:=])")
# "Enter your password: Settings." is an instruction, not a value: a key after these words is prose
_INSTRUCTION_BEFORE = re.compile(r"(?i)\b(?:your|the|a|new|reset|forgot|forgotten|change|enter|type)\s+$")
_KEYWORD_SECRET = re.compile(
    r"(?i)(?<![a-z])(?:api[_-]?key|apikey|secret(?:[_-]?key)?|client[_-]?secret|access[_-]?token"
    r"|auth[_-]?token|"
    r"bearer[_-]?token|private[_-]?key|signing[_-]?key|encryption[_-]?key|token|accountkey)"
    r"[\"']?\s*[:=]\s*(?P<q>[\"']?)(?P<v>[^\s\"',;]{16,})"
)
_TOKEN_RUN = re.compile(r"(?<![A-Za-z0-9+/_.-])[A-Za-z0-9]{32,}(?![A-Za-z0-9/_.-])")


def _classes(value: str) -> int:
    return sum(bool(re.search(p, value)) for p in (r"[a-z]", r"[A-Z]", r"\d", r"[^A-Za-z0-9]"))


def _assigned_value(pattern: re.Pattern, text: str, min_classes: int = 2) -> bool:
    for match in pattern.finditer(text):
        value = match.group("v").rstrip(".)]}>")
        if _PLACEHOLDER.match(value) or len(value) < 4:
            continue
        # "the password is correct" is prose: a real value mixes character classes or is quoted
        if match.group("q") or _classes(value) >= min_classes:
            return True
    return False


def _has_password(text: str) -> bool:
    if _assigned_value(_PASSWORD, text):
        return True
    # A plain word is a password too when it is the whole value of a `password:` / `passwd=` field
    # ("password: sunshine"): the mixed-class test above is for the prose form ("the password is
    # correct"), where a plain word is usually just a word.
    for match in _PASSWORD.finditer(text):
        value = match.group("v").rstrip(".!)]}>")
        if (match.group("sep") and value.isalpha() and not _PLACEHOLDER.match(value)
                and _FIELD_END.match(text, match.end())
                and not _INSTRUCTION_BEFORE.search(text, max(0, match.start() - 20), match.start())):
            return True
    return False


def _has_keyword_secret(text: str) -> bool:
    return _assigned_value(_KEYWORD_SECRET, text)


def _entropy(value: str) -> float:
    counts = Counter(value)
    return -sum(c / len(value) * math.log2(c / len(value)) for c in counts.values())


def _has_random_token(text: str) -> bool:
    """A 32+ character alphanumeric run that looks random: mixed case, digits, high entropy, no CamelCase."""
    for match in _TOKEN_RUN.finditer(text):
        run = match.group()
        before = text[max(0, match.start() - 8): match.start()].lower()
        if re.search(r"(?:base64,|sha\d+[-:]|md5[-:])$", before):  # data URIs and integrity digests
            continue
        word_start = max(text.rfind(" ", 0, match.start()), text.rfind("\n", 0, match.start())) + 1
        if re.search(r"https?://|www\.", text[word_start: match.start()]):  # ids in links, not keys
            continue
        upper, lower, digits = (sum(c.isupper() for c in run), sum(c.islower() for c in run),
                                sum(c.isdigit() for c in run))
        if min(upper, lower) < 0.15 * len(run) or digits < 3 or _entropy(run) < 4.2:
            continue
        # CamelCase identifiers put a lower-case letter after almost every capital; random tokens do not
        caps_then_lower = len(re.findall(r"[A-Z](?=[a-z])", run))
        if caps_then_lower / max(upper, 1) > 0.8:
            continue
        return True
    return False


# detect-secrets plugin class -> reason. Its entropy and keyword plugins are left out on purpose (they
# flag git hashes and digests, and need a file name to judge assignments); IPs are ours.
_DETECT_SECRETS_PLUGINS = {
    "AWSKeyDetector": "pii:aws_key", "PrivateKeyDetector": "pii:private_key", "JwtTokenDetector": "pii:jwt",
    "BasicAuthDetector": "pii:credentials_in_url", "ArtifactoryDetector": "pii:api_key",
    "AzureStorageKeyDetector": "pii:api_key", "CloudantDetector": "pii:api_key",
    "DiscordBotTokenDetector": "pii:api_key", "GitHubTokenDetector": "pii:api_key",
    "GitLabTokenDetector": "pii:api_key", "IbmCloudIamDetector": "pii:api_key",
    "IbmCosHmacDetector": "pii:api_key",
    "MailchimpDetector": "pii:api_key", "NpmDetector": "pii:api_key", "OpenAIDetector": "pii:api_key",
    "PypiTokenDetector": "pii:api_key", "SendGridDetector": "pii:api_key", "SlackDetector": "pii:api_key",
    "SquareOAuthDetector": "pii:api_key", "StripeDetector": "pii:api_key",
    "TelegramBotTokenDetector": "pii:api_key",
    "TwilioKeyDetector": "pii:api_key",
}


@lru_cache(maxsize=1)
def _detect_secrets_plugins() -> tuple[tuple[str, Any], ...]:
    if importlib.util.find_spec("detect_secrets") is None:
        return ()
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    classes = {cls.__name__: cls for cls in get_mapping_from_secret_type_to_class().values()}
    return tuple((reason, classes[name]()) for name, reason in _DETECT_SECRETS_PLUGINS.items()
                 if name in classes)


# every vendor format detect-secrets knows has a 20+ character token, a key block or a URL with a password
_SECRET_HINT = re.compile(r"[\w/+=.-]{20,}|PRIVATE KEY|://[^\s/@]*:[^\s/@]*@")


def detect_secrets_reason(text: str) -> str | None:
    """The reason of the first detect-secrets vendor plugin that matches `text` (None without the package)."""
    plugins = _detect_secrets_plugins()
    if not _SECRET_HINT.search(text):
        return None
    if not plugins:
        _warn_missing("detect-secrets", "only the built-in token formats are checked (npm, SendGrid, Twilio, "
                      "Telegram, Azure, Discord, Mailchimp, PyPI, Square and Artifactory tokens are missed)")
        return None
    for reason, plugin in plugins:
        if any(True for _ in plugin.analyze_string(text)):
            return reason
    return None


def _search(pattern: re.Pattern) -> Detector:
    return pattern.search


# (reason, detector) in the order they are checked; the first match names the reason. A detector is a
# compiled regex or a callable `text -> truthy`; the lists are plain data, so users can extend them.
SECRET_PATTERNS: list[tuple[str, re.Pattern | Detector]] = [
    ("pii:private_key", _PRIVATE_KEY),
    ("pii:aws_key", _AWS_KEY),
    ("pii:api_key", _API_KEY),
    ("pii:jwt", _JWT),
    ("pii:credentials_in_url", _CREDENTIALS_URL),
    ("pii:password", _has_password),
    ("pii:secret", _has_keyword_secret),
    ("pii:secret", _has_random_token),
]
PERSONAL_PATTERNS: list[tuple[str, re.Pattern | Detector]] = [
    ("pii:email", _has_email),
    ("pii:credit_card", _has_card),
    ("pii:iban", _has_iban),
    ("pii:us_ssn", _has_ssn),
    ("pii:uk_nino", _NINO),
    ("pii:phone", _has_phone),
    ("pii:ip_address", _has_ip),
    ("pii:date_of_birth", lambda text: bool(_DOB_HINT.search(text) and _DOB.search(text))),
    ("pii:passport", lambda text: bool(_PASSPORT_HINT.search(text) and _PASSPORT.search(text))),
    ("pii:street_address", _STREET),
]
PII_PATTERNS: list[tuple[str, re.Pattern | Detector]] = SECRET_PATTERNS + PERSONAL_PATTERNS
PII_KINDS: tuple[str, ...] = tuple(dict.fromkeys(r for r, _ in PII_PATTERNS))


def _hit(pattern: re.Pattern | Detector, text: str) -> bool:
    return bool(pattern.search(text) if isinstance(pattern, re.Pattern) else pattern(text))


def find_pii(
    text: str, patterns: list[tuple[str, Any]] | None = None, detect_secrets: bool = True
) -> str | None:
    """The reason of the first PII / secret detector that fires on `text`, or None.

    With the default patterns, detect-secrets' vendor plugins run after the built-in secret rules
    (when the package is installed and `detect_secrets=True`).
    """
    if patterns is not None:
        return next((reason for reason, p in patterns if _hit(p, text)), None)
    for reason, pattern in SECRET_PATTERNS:
        if _hit(pattern, text):
            return reason
    if detect_secrets:
        reason = detect_secrets_reason(text)
        if reason:
            return reason
    return next((reason for reason, p in PERSONAL_PATTERNS if _hit(p, text)), None)


def presidio_detector(
    analyzer: Any = None,
    entities: Sequence[str] | None = None,
    language: str = "en",
    score_threshold: float = 0.5,
) -> Detector:
    """A detector backed by Microsoft Presidio's `AnalyzerEngine` (optional; `pip install presidio-analyzer`).

    Returns `text -> "pii:<entity>" | None`, usable in `PrivacyFilter(extra_detectors=[...])`. Presidio
    needs a spaCy model for names and locations (`python -m spacy download en_core_web_lg`), which is
    why it is not the default: the built-in rules need no model and are measured on our labelled set.
    Pass your own configured `analyzer` to pick the NLP engine.
    """
    if analyzer is None:
        if importlib.util.find_spec("presidio_analyzer") is None:
            raise ModuleNotFoundError("presidio_detector needs presidio-analyzer: `pip install "
                                      "presidio-analyzer` and a spaCy model (`python -m spacy download "
                                      "en_core_web_lg`).")
        from presidio_analyzer import AnalyzerEngine

        analyzer = AnalyzerEngine()
    wanted = list(entities) if entities is not None else None

    def presidio(text: str) -> str | None:
        results = analyzer.analyze(text=text, language=language, entities=wanted)
        best = max((r for r in results if r.score >= score_threshold), key=lambda r: r.score, default=None)
        return None if best is None else f"pii:{best.entity_type.lower()}"

    return presidio


def privacy_scores(texts: Sequence[str], kinds: Sequence[str | None],
                   find: Callable[[str], str | None] = find_pii) -> dict[str, Any]:
    """Precision and recall of a detector on labelled strings (`kind` None = must be kept).

    Recall is per labelled kind (found under any reason); precision is overall and per reason
    (a flagged string is a true positive when it is labelled with any kind).
    """
    if len(texts) != len(kinds):
        raise ValueError(f"texts and kinds differ in length: {len(texts)} vs {len(kinds)}.")
    reasons = [find(t) for t in texts]
    positives = [k is not None for k in kinds]
    flagged = [r is not None for r in reasons]
    tp = sum(p and f for p, f in zip(positives, flagged, strict=True))
    fp = sum(f and not p for p, f in zip(positives, flagged, strict=True))
    per_kind: dict[str, dict[str, Any]] = {}
    for kind, reason in zip(kinds, reasons, strict=True):
        if kind is not None:
            row = per_kind.setdefault(kind, {"n": 0, "found": 0})
            row["n"] += 1
            row["found"] += reason is not None
    for row in per_kind.values():
        row["recall"] = row["found"] / row["n"]
    per_reason: dict[str, dict[str, Any]] = {}
    for kind, reason in zip(kinds, reasons, strict=True):
        if reason is not None:
            row = per_reason.setdefault(reason, {"flagged": 0, "true": 0})
            row["flagged"] += 1
            row["true"] += kind is not None
    for row in per_reason.values():
        row["precision"] = row["true"] / row["flagged"]
    n_pos = sum(positives)
    return {
        "n": len(texts), "positives": n_pos, "negatives": len(texts) - n_pos, "true_positives": tp,
        "false_positives": fp, "recall": tp / n_pos if n_pos else float("nan"),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "per_kind": dict(sorted(per_kind.items())), "per_reason": dict(sorted(per_reason.items())),
        "missed": [t for t, k, r in zip(texts, kinds, reasons, strict=True) if k is not None and r is None],
        "false_alarms": [(t, r) for t, k, r in zip(texts, kinds, reasons, strict=True)
                         if k is None and r is not None],
    }


class PrivacyFilter(Selector):
    """Drops samples that copy >= `min_copied_words` consecutive words of `real_texts`, or hold PII / secrets.

    Args:
        real_texts: the real training data to protect (optional; without it only PII is checked).
        min_copied_words: length, in normalized words, of a verbatim span that counts as a copy.
        pii: check the PII and secret detectors.
        patterns: `(reason, compiled regex or callable)` pairs replacing the built-in detectors.
        kinds: keep only these built-in reasons (e.g. `["pii:email", "pii:phone"]`); None = all.
        extra_detectors: callables `text -> reason | None` run after the built-ins (`presidio_detector()`).
        detect_secrets: also run detect-secrets' vendor-token plugins when the package is installed.
        target: `"both"` by default (a leaked span in a Magpie instruction counts too).
        **kwargs: further `Selector` options.
    """

    def __init__(
        self,
        real_texts: Iterable[str] | None = None,
        min_copied_words: int = 32,
        pii: bool = True,
        patterns: list[tuple[str, Any]] | None = None,
        kinds: Sequence[str] | None = None,
        extra_detectors: Sequence[Callable[[str], str | None]] = (),
        detect_secrets: bool = True,
        **kwargs: Any,
    ):
        kwargs.setdefault("name", "privacy")
        kwargs.setdefault("target", "both")
        kwargs.setdefault("batch_size", 4096)
        super().__init__(**kwargs)
        if isinstance(real_texts, str):
            raise TypeError("real_texts must be a list of strings, got a single string; wrap it in a list.")
        if isinstance(min_copied_words, bool) or not isinstance(min_copied_words, int) \
                or min_copied_words < 1:
            raise ValueError(f"min_copied_words must be a positive integer, got {min_copied_words!r}. "
                             "Default: 32.")
        if real_texts is None and not pii:
            raise ValueError("PrivacyFilter with real_texts=None and pii=False would check nothing.")
        if kinds is not None:
            unknown = sorted(set(kinds) - set(PII_KINDS))
            if unknown:
                raise ValueError(f"kinds={unknown} are unknown; choose from {list(PII_KINDS)}.")
            if patterns is not None:
                raise ValueError("pass either patterns= (your own detectors) or kinds= (a subset of ours), "
                                 "not both.")
            patterns = [(r, p) for r, p in PII_PATTERNS if r in set(kinds)]
        if not all(callable(d) for d in extra_detectors):
            raise TypeError("extra_detectors must be callables text -> reason | None.")
        self.n = min_copied_words
        self.pii = pii
        self.patterns = patterns
        self.extra_detectors = list(extra_detectors)
        self.detect_secrets = detect_secrets and kinds is None
        # Every n-word window of the real data: a sample copies >= n words iff it shares one of them.
        self._windows: set[int] = set()
        for text in real_texts or ():
            self._windows.update(self._hashes(normalize_words(text)))

    def _hashes(self, words: list[str]) -> set[int]:
        return {hash(tuple(words[i : i + self.n])) for i in range(len(words) - self.n + 1)}

    def find(self, text: str) -> str | None:
        """The reason `text` would be dropped for PII, or None."""
        reason = find_pii(text, self.patterns, detect_secrets=self.detect_secrets)
        for detector in self.extra_detectors:
            if reason is not None:
                break
            reason = detector(text) or None
        return reason

    def keep(self, batch: dict[str, list]) -> list[str | None]:
        reasons: list[str | None] = []
        for text in self.texts(batch):
            reason = None
            if self._windows and not self._windows.isdisjoint(self._hashes(normalize_words(text))):
                reason = "verbatim_copy"
            elif self.pii:
                reason = self.find(text)
            reasons.append(reason)
        return reasons
