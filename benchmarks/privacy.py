"""Precision and recall of PrivacyFilter's detectors on the labelled strings in tests/data/.

Writes benchmarks/results/privacy.json: overall and per-kind figures for the current detectors, the
same without the optional libraries (phonenumbers / detect-secrets replaced by the fallbacks), and,
with --baseline-ref, the detectors of an older commit (the "before" numbers); then what fires on real
human text (gensim's 300 news articles and ~5k Wikipedia paragraphs) and the time per document.

Run:

    python benchmarks/privacy.py --baseline-ref 0c64503
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
SETS = {"labelled": ROOT / "tests/data/privacy_labelled.jsonl",
        "holdout": ROOT / "tests/data/privacy_holdout.jsonl"}


def load(path: Path) -> tuple[list[str], list[str | None]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["text"] for r in rows], [r["kind"] for r in rows]


def baseline_find(ref: str):
    source = subprocess.run(["git", "show", f"{ref}:collapse_guard/selection/privacy.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "privacy_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("privacy_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_pii


def summary(scores: dict) -> dict:
    keys = ("n", "positives", "negatives", "true_positives", "false_positives", "recall", "precision",
            "per_kind", "per_reason", "missed", "false_alarms")
    return {k: scores[k] for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline-ref", default=None,
                        help="git ref whose privacy.py gives the 'before' numbers")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/privacy.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from collapse_guard.selection import privacy

    results: dict = {}
    for name, path in SETS.items():
        if not path.exists():
            continue
        texts, kinds = load(path)
        start = time.perf_counter()
        current = privacy.privacy_scores(texts, kinds)
        ms = (time.perf_counter() - start) * 1000 / len(texts)
        entry = {"current": {**summary(current), "ms_per_text": round(ms, 3)}}
        real_find_spec = importlib.util.find_spec

        def no_optional(name_, *a, real=real_find_spec, **k):
            return None if name_ in ("phonenumbers", "detect_secrets") else real(name_, *a, **k)

        privacy._detect_secrets_plugins.cache_clear()
        with mock.patch.object(privacy.importlib.util, "find_spec", no_optional), \
                mock.patch.object(privacy, "_warn_missing", lambda *a: None):
            entry["without_optional_libraries"] = summary(privacy.privacy_scores(texts, kinds))
        privacy._detect_secrets_plugins.cache_clear()
        entry["without_detect_secrets"] = summary(privacy.privacy_scores(
            texts, kinds, lambda t: privacy.find_pii(t, detect_secrets=False)))
        if args.baseline_ref:
            entry["before"] = summary(privacy.privacy_scores(texts, kinds, baseline_find(args.baseline_ref)))
        results[name] = entry
        for label, r in entry.items():
            print(f"{name:9s} {label:28s} recall {r['recall']:.3f}  precision {r['precision']:.3f}  "
                  f"missed {len(r['missed'])}  false alarms {len(r['false_alarms'])}")
    # real human text (gensim's news and Wikipedia samples): what fires on text that is not a test case
    if importlib.util.find_spec("gensim") is not None:
        from collections import Counter

        from collapse_guard.resources import human_texts

        results["human_text"] = {}
        old = baseline_find(args.baseline_ref) if args.baseline_ref else None
        for name in ("lee_background", "wiki"):
            docs = human_texts(name)
            start = time.perf_counter()
            reasons = [privacy.find_pii(d) for d in docs]
            ms = (time.perf_counter() - start) * 1000 / len(docs)
            entry = {"docs": len(docs), "words": sum(len(d.split()) for d in docs),
                     "flagged": dict(Counter(r for r in reasons if r)), "ms_per_doc": round(ms, 2)}
            if old is not None:
                start = time.perf_counter()
                entry["flagged_before"] = dict(Counter(r for r in map(old, docs) if r))
                entry["ms_per_doc_before"] = round((time.perf_counter() - start) * 1000 / len(docs), 2)
            results["human_text"][name] = entry
            print(f"human text {name}: {entry}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
