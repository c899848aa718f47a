"""Base-model evaluations computed once and shared by every run that scores the same model.

Every method of a comparison evaluates the untrained models before its first round, and
Zero-Shot evaluates nothing else: the same base model on the same questions, as many times as
there are methods (and, for Standalone, clients). A `BaselineStore` in a folder keeps each such
evaluation's per-choice log-likelihoods under a key of everything they depend on, so the first
run computes them and the others read them back — bit for bit the numbers they would have
computed (float64 in JSON round-trips exactly).

The key hashes the model's name and weight dtype, the evaluation batch size (padding can change
the last bits of a log-likelihood) and the encoded sequences themselves (token ids, context
lengths, which question each belongs to, the gold answers and the choice texts), so a different
tokenizer, BOS setting, truncation or question set is a different key. A model is only looked up
while its adapter is the identity (`adapter_is_identity`): then it scores as its base model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from peft import PeftModel

from fedcollm.evaluation.multiple_choice import EncodedRequests
from fedcollm.lm.devices import model_device
from fedcollm.lm.lora import adapter_is_identity

FORMAT = 1
"""Version of the stored files; a change of layout changes every key."""


def baseline_key(name: str, model: PeftModel, encoded: EncodedRequests, batch_size: int) -> str:
    """The key of one base-model evaluation: model name, weight dtype, batch size, sequences, and
    the device type where it is not the CPU (kernels differ in rounding between devices)."""
    dtypes = sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad} or {"none"})
    device = model_device(model).type
    digest = hashlib.sha256()
    digest.update(
        json.dumps([FORMAT, name, dtypes, batch_size, *([device] if device != "cpu" else [])]).encode()
    )
    for sequence, question in zip(encoded.sequences, encoded.question_of, strict=True):
        digest.update(json.dumps([question, sequence.n_context, sequence.input_ids]).encode())
    for request in encoded.requests:
        digest.update(json.dumps([request.id, request.gold, request.choice_texts]).encode())
    return digest.hexdigest()[:24]


@dataclass
class BaselineStore:
    """A folder of base-model log-likelihoods, one JSON file per key (see the module docstring)."""

    folder: Path
    hits: int = 0
    """Lookups answered from the folder (in this process)."""
    misses: int = 0
    """Lookups that had to compute (and then stored their result)."""
    _memory: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def get(self, key: str) -> np.ndarray | None:
        """The stored log-likelihoods under `key`, or None."""
        if key in self._memory:
            return self._memory[key]
        path = self.folder / f"{key}.json"
        if not path.is_file():
            return None
        try:
            values = np.asarray(
                json.loads(path.read_text(encoding="utf-8"))["loglikelihoods"], dtype=np.float64
            )
        except (ValueError, KeyError, TypeError):
            return None  # a damaged file is recomputed and rewritten, never trusted
        self._memory[key] = values
        return values

    def put(self, key: str, loglikelihoods: np.ndarray, model: str) -> None:
        """Store `loglikelihoods` under `key` (atomically: temp file, then rename)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{key}.json"
        tmp = path.with_name(path.name + ".tmp")
        data = {"model": model, "loglikelihoods": [float(x) for x in loglikelihoods]}
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, path)
        self._memory[key] = np.asarray(loglikelihoods, dtype=np.float64)

    def loglikelihoods(
        self,
        name: str,
        model: PeftModel,
        encoded: EncodedRequests,
        batch_size: int,
        compute: Callable[[], np.ndarray],
    ) -> tuple[np.ndarray, bool]:
        """`compute()`'s result, from the store where the model is its base model and it is there.

        Returns the log-likelihoods and whether they came from the store.
        """
        if not adapter_is_identity(model):
            return compute(), False
        key = baseline_key(name, model, encoded, batch_size)
        stored = self.get(key)
        if stored is not None and stored.shape == (len(encoded.sequences),):
            self.hits += 1
            return stored, True
        self.misses += 1
        values = compute()
        self.put(key, values, name)
        return values, False
