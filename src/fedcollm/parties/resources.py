"""What the parties of one process build at most once and share: tokenizers, token bridges and
base-model evaluations.

A server that receives knowledge from clients running other models needs those models'
tokenizers (not their weights), and every pair of tokenizers that split texts differently needs
a MinED `TokenBridge`, whose construction reads its vocabulary map from the disk cache and
normalises both vocabularies (seconds for Gemma's 262k tokens). The embedded engine gives its
server and all its clients one `SharedResources`; each Flower client process holds its own.
A comparison also hands every run one `BaselineStore`, so each base model is evaluated once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fedcollm.align.bridge import TokenBridge, needs_bridge
from fedcollm.evaluation.baselines import BaselineStore
from fedcollm.lm.loading import load_tokenizer
from fedcollm.lm.models import LoadedModel


@dataclass
class SharedResources:
    """Tokenizers by model name and bridges by (source, target) model name, built on first use;
    optionally the store of base-model evaluations."""

    tokenizers: dict[str, PreTrainedTokenizerBase] = field(default_factory=dict)
    bridges: dict[tuple[str, str], TokenBridge | None] = field(default_factory=dict)
    baselines: BaselineStore | None = None
    """Where base-model evaluations are kept across runs (None: every run evaluates its own)."""

    def know(self, lm: LoadedModel) -> None:
        """Reuse a loaded model's tokenizer instead of loading it again by name."""
        self.tokenizers.setdefault(lm.name, lm.tokenizer)

    def tokenizer(self, name: str) -> PreTrainedTokenizerBase:
        """The tokenizer of model `name` (loaded once)."""
        if name not in self.tokenizers:
            self.tokenizers[name] = load_tokenizer(name)
        return self.tokenizers[name]

    def bridge(self, src: str, dst: str) -> TokenBridge | None:
        """The MinED bridge from model `src`'s tokens to model `dst`'s; None where they tokenise alike.

        Built once per pair; the reverse direction reuses it (`TokenBridge.reversed`).
        """
        key = (src, dst)
        if key not in self.bridges:
            reverse = self.bridges.get((dst, src))
            if (dst, src) in self.bridges:
                self.bridges[key] = reverse.reversed() if reverse is not None else None
            elif src == dst or not needs_bridge(self.tokenizer(src), self.tokenizer(dst)):
                self.bridges[key] = self.bridges[(dst, src)] = None
            else:
                self.bridges[key] = TokenBridge.build(self.tokenizer(src), self.tokenizer(dst))
        return self.bridges[key]
