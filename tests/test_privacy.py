"""PrivacyFilter on labelled strings: the measured precision / recall floors, look-alikes kept, fallbacks."""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

from collapse_guard.selection import privacy
from collapse_guard.selection.privacy import (
    PII_KINDS,
    PrivacyFilter,
    find_pii,
    presidio_detector,
    privacy_scores,
)

DATA = Path(__file__).parent / "data"
HAVE_LIBS = all(importlib.util.find_spec(m) is not None for m in ("phonenumbers", "detect_secrets"))


def load(name: str):
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [r["text"] for r in rows], [r["kind"] for r in rows], rows


def test_labelled_set_is_what_the_docs_claim():
    texts, kinds, rows = load("privacy_labelled.jsonl")
    assert len(texts) >= 150 and len(set(texts)) == len(texts)
    secrets = {"private_key", "aws_key", "github_token", "gitlab_token", "slack_token", "stripe_key",
               "openai_key", "anthropic_key", "huggingface_token", "google_api_key", "jwt", "password",
               "credentials_in_url", "npm_token", "sendgrid_key", "twilio_key", "telegram_token", "azure_key",
               "generic_secret"}
    present = {k for k in kinds if k}
    assert len(present & secrets) >= 10 and len(present - secrets) >= 10
    lookalikes = {r["lookalike"] for r in rows if r["kind"] is None}
    assert {"version", "commit_hash", "digest", "file_at", "numeric_table", "uuid", "isbn"} <= lookalikes


@pytest.mark.skipif(not HAVE_LIBS, reason="needs phonenumbers and detect-secrets (collapse-guard[privacy])")
@pytest.mark.parametrize("name", ["privacy_labelled.jsonl", "privacy_holdout.jsonl"])
def test_precision_and_recall_floors(name):
    texts, kinds, _ = load(name)
    scores = privacy_scores(texts, kinds)
    # documented floors (measured 1.00 / 1.00 on both sets; the held-out set scored 0.95 / 0.95 when
    # first run, before the four fixes it prompted)
    assert scores["recall"] >= 0.95, scores["missed"]
    assert scores["precision"] >= 0.95, scores["false_alarms"]
    assert all(row["recall"] >= 0.75 for row in scores["per_kind"].values()), scores["per_kind"]


def test_fallback_without_optional_libraries_still_useful():
    texts, kinds, _ = load("privacy_labelled.jsonl")
    real = importlib.util.find_spec

    def missing(name, *args, **kwargs):
        return None if name in ("phonenumbers", "detect_secrets") else real(name, *args, **kwargs)

    privacy._detect_secrets_plugins.cache_clear()
    privacy._warn_once.cache_clear()
    try:
        with mock.patch.object(privacy.importlib.util, "find_spec", missing), \
                pytest.warns(UserWarning, match="phonenumbers is not installed"):
            scores = privacy_scores(texts, kinds)
    finally:
        privacy._detect_secrets_plugins.cache_clear()
        privacy._warn_once.cache_clear()
    assert scores["recall"] >= 0.85 and scores["precision"] >= 0.95  # measured 0.863 / 0.989


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Text me on 07700 900461.", "pii:phone"),
        ("Mon portable : 06 12 34 56 78.", "pii:phone"),
        ("scores were 100 200 3000", None),
        ("Write to José.Martínez@correo.es", "pii:email"),
        ("ann [at] example [dot] com", "pii:email"),
        ("Add icon@2x.png to the catalog.", None),
        ("npm install react@18.2.0", None),
        ("Fix bug (a94a8fe5ccb19ba61c4c0873d391e987982fbbd3)", None),
        ("sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", None),
        ("Extend AbstractSingletonProxyFactoryBeanConfigurationProvider2 instead.", None),
        ("Open /Users/alice/Library/Application Support/Code/User/settings.json", None),
        ("-----BEGIN PGP PRIVATE KEY BLOCK-----", "pii:private_key"),
        ("stripe.api_key = 'sk_live_4eC39HqLyjWDarjtT1zdp7dc'", "pii:api_key"),
        ("password: hunter2!", "pii:password"),
        ("password: ********", None),
        ("SSN: 412-67-0093", "pii:us_ssn"),
        ("IBAN: DE89 3704 0044 0532 0130 00", "pii:iban"),
        ("IBAN: DE89 3704 0044 0532 0130 01", None),  # checksum fails
        ("Request id 123e4567-e89b-12d3-a456-426614174000 failed.", None),
        ("ISBN 978-0-306-40615-7 is the second edition.", None),
        ("Point it at 192.168.1.10, not 84.17.45.201.", "pii:ip_address"),
        ("Upgrade to release 2.14.3.1 before Monday.", None),
    ],
)
@pytest.mark.skipif(not HAVE_LIBS, reason="needs phonenumbers and detect-secrets")
def test_kinds_and_lookalikes(text, reason):
    assert find_pii(text) == reason


def test_kinds_subset_extra_detectors_and_bad_arguments():
    only_email = PrivacyFilter(kinds=["pii:email"])
    kept = only_email(["ann@example.com", "password: hunter2!", "fine"])
    assert kept["text"][:] == ["password: hunter2!", "fine"]
    with pytest.raises(ValueError, match=r"kinds=\['pii:nope'\] are unknown"):
        PrivacyFilter(kinds=["pii:nope"])
    with pytest.raises(ValueError, match="either patterns="):
        PrivacyFilter(kinds=["pii:email"], patterns=[])
    with pytest.raises(TypeError, match="extra_detectors"):
        PrivacyFilter(extra_detectors=["not callable"])
    custom = PrivacyFilter(extra_detectors=[lambda t: "pii:codename" if "Project Falcon" in t else None])
    custom(["Project Falcon ships Monday.", "ok"])
    assert custom.report["reasons"] == {"pii:codename": 1}
    assert "pii:phone" in PII_KINDS and len(PII_KINDS) == len(set(PII_KINDS))


def test_presidio_detector_adapts_an_analyzer():
    class FakeAnalyzer:  # presidio_analyzer.AnalyzerEngine's interface; the real one needs a spaCy model
        def analyze(self, text, language, entities):
            found = [SimpleNamespace(entity_type="PERSON", score=0.85, start=m.start(), end=m.end())
                     for m in re.finditer(r"Alice Smith", text)]
            return found + [SimpleNamespace(entity_type="LOCATION", score=0.3, start=0, end=1)]

    detector = presidio_detector(FakeAnalyzer())
    assert detector("Ask Alice Smith.") == "pii:person" and detector("Ask nobody.") is None
    selector = PrivacyFilter(extra_detectors=[detector])
    assert selector(["Ask Alice Smith.", "Ask nobody."])["text"][:] == ["Ask nobody."]
    if importlib.util.find_spec("presidio_analyzer") is None:
        with pytest.raises(ModuleNotFoundError, match="pip install presidio-analyzer"):
            presidio_detector()


def test_privacy_scores_counts():
    scores = privacy_scores(["a@b.co", "fine", "x@y.org", "icon@2x.png"], ["email", None, "email", None])
    assert (scores["recall"], scores["precision"], scores["false_positives"]) == (1.0, 1.0, 0)
    with pytest.raises(ValueError, match="differ in length"):
        privacy_scores(["a"], [])


def test_long_adversarial_inputs_stay_fast():
    import time

    start = time.perf_counter()
    for text in ["1 " * 10_000, "at dot " * 3_000, "x [at] y " * 2_000, "Aa1" * 7_000, "0" * 20_000]:
        assert find_pii(text) is None
    assert time.perf_counter() - start < 20  # ~1 s here; a backtracking regex took minutes on these


# Issue 23 §6: the reserved 555 area code was a phone in one layout and not in the others.
RESERVED_555_LAYOUTS = ["(555) 123-4567", "555-123-4567", "555.123.4567", "555 123 4567", "1-555-123-4567",
                        "+1 555 123 4567", "+1 (555) 123-4567", "+15551234567", "call 5551234567"]


@pytest.mark.parametrize("with_libs", [True, False])
def test_reserved_555_numbers_follow_one_rule_in_every_layout(with_libs):
    texts = [f"Reach the desk at {n}." for n in RESERVED_555_LAYOUTS]
    # the same rule as for any North-American number: bare digits are an id unless a word says phone
    keep = ["Ticket 5551234567 closed.", "Ticket 2015550123 closed.", "I paid 5555-5555-5555-4444."]
    real = importlib.util.find_spec

    def missing(name, *args, **kwargs):
        return None if name == "phonenumbers" else real(name, *args, **kwargs)

    flt = PrivacyFilter(kinds=["pii:phone"])
    privacy._warn_once.cache_clear()
    with mock.patch.object(privacy.importlib.util, "find_spec", real if with_libs else missing), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = flt(texts + keep)["text"][:]
    privacy._warn_once.cache_clear()
    assert kept == keep
    assert flt.report["reasons"] == {"pii:phone": len(texts)}


def test_plain_word_passwords_in_a_field_are_dropped_prose_is_kept():
    leaks = ["password: sunshine", "passwd: dragon", "Password: letmein\nUser: bob", "passwd=monkey",
             "user: bob, passwd: dragon, host: db1", "my password: sunshine."]
    prose = ["Forgot your password: click here", "Password: must be 8 characters.", "password: required",
             "the password is correct", "password: ********", "Enter password: below", "PASSWORD: Optional"]
    flt = PrivacyFilter(kinds=["pii:password"])
    assert flt(leaks + prose)["text"][:] == prose
    assert flt.report["reasons"] == {"pii:password": len(leaks)}
