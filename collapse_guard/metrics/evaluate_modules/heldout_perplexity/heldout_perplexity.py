"""`evaluate` module: held-out perplexity (collapse_guard.metrics.HeldoutPerplexity).

Load it offline from the installed package:

```python
>>> from collapse_guard.metrics import load_metric
>>> from collapse_guard.testing import tiny_tokenizer, tiny_causal_lm
>>> tok = tiny_tokenizer()
>>> out = load_metric("heldout_perplexity").compute(
...     predictions=["The river crossed the valley."], model=tiny_causal_lm(tok), tokenizer=tok)
>>> out["perplexity"] > 1
True

```
"""

import datasets
import evaluate

from collapse_guard.metrics.perplexity import HeldoutPerplexity

_DESCRIPTION = """Corpus perplexity exp(sum NLL / sum predicted tokens) of a causal LM on a fixed set of \
texts,
at a fixed context: non-overlapping blocks of `context_length` tokens, or sliding windows advancing by
`stride` where only new tokens are scored. Length-bucketed batches, chunked cross-entropy (no full
[B, L, V] logits), works on PEFT/DDP/FSDP-wrapped models and all-reduces the sums under torch.distributed
(call it on every rank with the same texts)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the held-out texts.
    model (torch.nn.Module, optional): a loaded causal LM (plain or wrapped); or
    model_id (str, optional): a local model directory (or hub id) loaded with AutoModelForCausalLM.
    tokenizer (optional): its tokenizer (loaded from `model_id` when omitted).
    context_length (int): tokens per window (default 512). stride (int, optional): sliding-window stride.
    max_batch_tokens (int): padded tokens per forward (default 16384). device (str, optional).
Returns:
    perplexity (float), nll_sum (float), n_tokens (int), per_document (list of float, NaN for texts
    shorter than 2 tokens), n_skipped (int).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class HeldoutPerplexityMetric(evaluate.Metric):
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
        model=None,
        model_id=None,
        tokenizer=None,
        context_length: int = 512,
        stride=None,
        max_batch_tokens: int = 16384,
        device=None,
    ) -> dict:
        if model is None and model_id is None:
            raise ValueError("pass model= (a loaded causal LM) or model_id= (a local model directory).")
        if model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_id)
            if device is not None:
                model = model.to(device)
        if tokenizer is None:
            from transformers import AutoTokenizer

            source = model_id or getattr(getattr(model, "config", None), "_name_or_path", None)
            if not source:
                raise ValueError("pass tokenizer= when model= has no model directory to load it from.")
            tokenizer = AutoTokenizer.from_pretrained(source)
        evaluator = HeldoutPerplexity(list(predictions), tokenizer, context_length, stride, max_batch_tokens)
        result = evaluator.compute(model)
        return {
            "perplexity": result.perplexity,
            "nll_sum": result.nll_sum,
            "n_tokens": result.n_tokens,
            "per_document": result.per_document,
            "n_skipped": result.n_skipped,
        }
