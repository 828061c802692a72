"""`evaluate` module: diversity signals of a set of generations (collapse_guard.metrics.diversity_metrics).

Load it offline from the installed package:

```python
>>> from collapse_guard.metrics import load_metric
>>> load_metric("diversity").compute(predictions=["a a a b"])["distinct_1"]
0.5

```
"""

import datasets
import evaluate

from collapse_guard.metrics.diversity import diversity_metrics

_DESCRIPTION = """Text-only collapse signals of generations from a fixed prompt set: distinct-1..4, unigram
entropy (bits), type-token ratio over fixed word windows, self-BLEU-4 (sacrebleu, 0..1), gzip compression
ratio, tail coverage of rare human word types (with `human_texts`) and embedding diversity
(1 - mean pairwise cosine, with `embedding_model`: a model directory or "all-MiniLM-L6-v2")."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the generations.
    human_texts (list of str, optional): human reference corpus for tail coverage.
    embedding_model (str, optional): sentence-embedding model directory, or "all-MiniLM-L6-v2".
    ttr_window (int): words per type-token-ratio segment (default 200).
    self_bleu_max_texts (int): texts sampled for self-BLEU (default 500), with `seed` (default 0).
Returns:
    dict of floats: distinct_1..distinct_4, unigram_entropy, ttr, self_bleu4, compression_ratio,
    [tail_coverage], [embedding_diversity].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Diversity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(
        self,
        predictions,
        human_texts=None,
        embedding_model=None,
        ttr_window: int = 200,
        self_bleu_max_texts: int = 500,
        seed: int = 0,
    ) -> dict:
        return diversity_metrics(
            list(predictions), human_texts, embedding_model, ttr_window, self_bleu_max_texts, seed
        )
