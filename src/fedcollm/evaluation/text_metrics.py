"""Scores of a generated answer against its references: exact match, token F1 and Rouge-L.

Exact match and token F1 follow the official SQuAD v1.1 evaluation script (the normalisation
lm-evaluation-harness copies into its QA tasks, e.g. `lm_eval/tasks/qasper/metrics.py`, and that
NQ-Open and TriviaQA scoring use): lower case, punctuation and the articles a/an/the removed,
whitespace collapsed. Written here, a dozen lines, because no maintained package exposes it
without a hub download (`evaluate.load("squad")`); `tests/test_generation.py` holds it equal to
lm-eval's copy. Rouge-L is the `rouge-score` package's F-measure, as lm-eval and FATE-LLM compute
it. Each score is the best over the references, as SQuAD scores a question with several answers.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles, single spaces."""
    lowered = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", lowered).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(ref) for ref in references))


def _f1(prediction_tokens: list[str], reference_tokens: list[str]) -> float:
    common = Counter(prediction_tokens) & Counter(reference_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD's token-overlap F1 of the normalised texts, the best over the references."""
    predicted = normalize_answer(prediction).split()
    return max((_f1(predicted, normalize_answer(ref).split()) for ref in references), default=0.0)


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Rouge-L F-measure (`rouge-score`, no stemming), the best over the references."""
    scorer = _rouge_scorer()
    return max((float(scorer.score(ref, prediction)["rougeL"].fmeasure) for ref in references), default=0.0)


@dataclass(frozen=True)
class TextScores:
    """One generated answer's scores, each in [0, 1]."""

    exact_match: float
    f1: float
    rouge_l: float


def score_text(prediction: str, references: Sequence[str]) -> TextScores:
    """Every metric of one prediction; `references` must not be empty."""
    if not references:
        raise ValueError("a generated answer needs at least one reference to be scored")
    return TextScores(
        exact_match(prediction, references), token_f1(prediction, references), rouge_l(prediction, references)
    )
