"""FedMKT knowledge sets: per-sample loss and per-answer-position top-K logits on the public set.

A knowledge set S = {(l^i, p^i)} describes what one model knows about each public example i:
its loss l^i on the example's answer and, at every answer position, its K largest logits with
their token ids (in that model's own vocabulary). Sets travel in a compact form: only answer
positions (where a loss is taken) are kept, ids as int32 and logits as float16, with one int32
length per sample to cut the rows back into samples. The receiver validates a set before using
it (sample count, lengths, ids within the sender's vocabulary, finite numbers), maps it onto its
own tokenizer with a `TokenBridge`, selects samples with DualMinCE and trains on them with
lambda*CE + (1-lambda)*KD.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel

from fedcollm.align.bridge import TokenBridge
from fedcollm.config import TrainConfig
from fedcollm.errors import FedcollmError
from fedcollm.lm.devices import from_numpy, model_device, to_numpy
from fedcollm.lm.encoding import Encoded, batches, collate
from fedcollm.lm.logits import answer_cross_entropy, per_sequence_sum, target_logits
from fedcollm.protocol import Arrays, StepCallback
from fedcollm.training.kd import kd_loss_sparse
from fedcollm.training.optimise import ONE_ROUND, ScheduleSpan, optimise

KEYS = ("loss", "lengths", "ids", "values")
"""The four arrays of a packed knowledge set."""


class KnowledgeError(FedcollmError, ValueError):
    """A knowledge set that cannot be used; the message names its sender and what is wrong."""


@dataclass(frozen=True)
class KnowledgeSet:
    """Per-sample loss [N] and top-K (ids, logits) rows over each sample's answer tokens.

    Rows of sample i are `ids[offsets[i]:offsets[i + 1]]`; `ids` may hold -1 (padding, after
    alignment) with `values` -inf there.
    """

    loss: np.ndarray  # float32 [N]
    lengths: np.ndarray  # int32 [N]: answer tokens of each sample
    ids: np.ndarray  # int32 [sum(lengths), K]
    values: np.ndarray  # float16 (packed) or float32 (aligned) [sum(lengths), K]

    def __len__(self) -> int:
        return int(self.loss.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[1])

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])

    def rows(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, values) [lengths[i], K] of sample i."""
        start, stop = self.offsets[i], self.offsets[i + 1]
        return self.ids[start:stop], self.values[start:stop]

    def pack(self, prefix: str = "") -> Arrays:
        """The compact form: loss float32, lengths int32, ids int32, values float16."""
        return {
            prefix + "loss": np.ascontiguousarray(self.loss, dtype=np.float32),
            prefix + "lengths": np.ascontiguousarray(self.lengths, dtype=np.int32),
            prefix + "ids": np.ascontiguousarray(self.ids, dtype=np.int32),
            prefix + "values": np.ascontiguousarray(self.values, dtype=np.float16),
        }

    @classmethod
    def unpack(cls, arrays: Mapping[str, np.ndarray], prefix: str = "", who: str = "sender") -> KnowledgeSet:
        """Read a packed set; missing or misshapen arrays raise `KnowledgeError` naming `who`."""
        missing = [prefix + key for key in KEYS if prefix + key not in arrays]
        if missing:
            raise KnowledgeError(f"{who}: knowledge set lacks {', '.join(missing)}")
        loss, lengths, ids, values = (np.asarray(arrays[prefix + key]) for key in KEYS)
        if loss.ndim != 1 or lengths.ndim != 1 or ids.ndim != 2 or values.ndim != 2:
            raise KnowledgeError(
                f"{who}: knowledge arrays have the wrong rank (loss {loss.shape}, lengths "
                f"{lengths.shape}, ids {ids.shape}, values {values.shape}; expected [N], [N], [P, K], [P, K])"
            )
        for name, array, kinds in (
            ("loss", loss, "f"),
            ("lengths", lengths, "iu"),
            ("ids", ids, "iu"),
            ("values", values, "f"),
        ):
            if array.dtype.kind not in kinds:
                raise KnowledgeError(f"{who}: knowledge {name} has dtype {array.dtype}")
        return cls(loss, lengths, ids, values)

    @property
    def nbytes(self) -> int:
        """Size of the packed form."""
        return sum(int(a.nbytes) for a in self.pack().values())


def validate_knowledge(
    knowledge: KnowledgeSet,
    *,
    who: str,
    num_samples: int,
    lengths: Sequence[int] | np.ndarray | None = None,
    vocab_size: int | None = None,
    max_top_k: int | None = None,
) -> KnowledgeSet:
    """Check a received set against what the receiver expects; raise `KnowledgeError` naming `who`.

    `lengths`: the answer-token count of every public sample in the sender's tokenisation (the
    receiver computes it itself); `vocab_size`: the sender's vocabulary.
    """
    if len(knowledge) != num_samples or knowledge.lengths.shape[0] != num_samples:
        raise KnowledgeError(
            f"{who}: knowledge set covers {len(knowledge)} losses and {knowledge.lengths.shape[0]} "
            f"lengths, but the public set has {num_samples} samples"
        )
    if lengths is not None:
        expected = np.asarray(lengths, dtype=np.int64)
        bad = np.flatnonzero(knowledge.lengths.astype(np.int64) != expected)
        if bad.size:
            i = int(bad[0])
            raise KnowledgeError(
                f"{who}: sample {i} has {int(knowledge.lengths[i])} answer positions, expected "
                f"{int(expected[i])} ({bad.size} samples differ)"
            )
    elif (knowledge.lengths < 0).any():
        raise KnowledgeError(f"{who}: negative sample lengths")
    total = int(knowledge.lengths.astype(np.int64).sum())
    if knowledge.ids.shape != knowledge.values.shape or knowledge.ids.shape[0] != total:
        raise KnowledgeError(
            f"{who}: ids {knowledge.ids.shape} and values {knowledge.values.shape} must both be "
            f"[{total}, K] (one row per answer position)"
        )
    if knowledge.ids.shape[1] < 1 or (max_top_k is not None and knowledge.ids.shape[1] > max_top_k):
        raise KnowledgeError(
            f"{who}: K = {knowledge.ids.shape[1]} logits per position, expected 1..{max_top_k}"
        )
    bad_loss = ~np.isfinite(knowledge.loss) | (knowledge.loss < 0)
    if bad_loss.any():
        raise KnowledgeError(
            f"{who}: {int(bad_loss.sum())} per-sample losses are NaN, infinite or negative "
            f"(first at sample {int(np.flatnonzero(bad_loss)[0])})"
        )
    bad_values = ~np.isfinite(knowledge.values)
    if bad_values.any():
        raise KnowledgeError(
            f"{who}: {int(bad_values.sum())} logits are NaN or infinite "
            f"(first at answer position {int(np.argwhere(bad_values)[0][0])})"
        )
    if knowledge.ids.size:
        low, high = int(knowledge.ids.min()), int(knowledge.ids.max())
        if low < 0 or (vocab_size is not None and high >= vocab_size):
            raise KnowledgeError(
                f"{who}: token ids range over [{low}, {high}], outside its vocabulary [0, {vocab_size})"
            )
    return knowledge


@torch.no_grad()
def compute_knowledge(
    model: PeftModel,
    examples: Sequence[Encoded],
    *,
    pad_id: int,
    top_k: int,
    batch_size: int,
    vocab_size: int | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    on_batch: Callable[[int, int], None] | None = None,
) -> KnowledgeSet:
    """A model's knowledge set on `examples`: per-sample CE on the answer, top-K logits per position.

    `vocab_size` (the tokenizer's length) drops logit rows past the real vocabulary, so every id
    maps through a vocabulary table. `top_k=0` computes the losses only.
    """
    if not examples:
        raise ValueError("no public examples to compute knowledge on")
    was_training = model.training
    model.eval()
    losses, ids, values = [], [], []
    total = -(-len(examples) // batch_size)
    device = model_device(model)
    for step, index in enumerate(batches(examples, batch_size), start=1):
        batch = collate([examples[i] for i in index], pad_id, device=device)
        logits = target_logits(model, batch)
        if vocab_size is not None:
            logits = logits[:, :vocab_size]
        ce = F.cross_entropy(logits, batch.targets, reduction="none")
        per_sample = per_sequence_sum(ce, batch, len(index))
        if reduction == "mean":
            counts = torch.bincount(batch.rows, minlength=len(index)).clamp(min=1)
            per_sample = per_sample / counts
        losses.append(to_numpy(per_sample).astype(np.float32))
        if top_k:
            k = min(top_k, logits.shape[-1])
            top = logits.topk(k, dim=-1)
            ids.append(to_numpy(top.indices).astype(np.int32))
            values.append(to_numpy(top.values).astype(np.float32))
        if on_batch is not None:
            on_batch(step, total)
    if was_training:
        model.train()
    k = min(top_k, vocab_size or top_k) if top_k else 0
    return KnowledgeSet(
        loss=np.concatenate(losses),
        lengths=np.asarray([e.n_target for e in examples], dtype=np.int32),
        ids=np.concatenate(ids) if ids else np.zeros((0, k), dtype=np.int32),
        values=np.concatenate(values) if values else np.zeros((0, k), dtype=np.float32),
    )


def align_knowledge(
    knowledge: KnowledgeSet,
    src_examples: Sequence[Encoded],
    dst_examples: Sequence[Encoded],
    bridge: TokenBridge | None,
    dst_vocab_size: int | None = None,
) -> KnowledgeSet:
    """Carry a set onto another tokenizer's answer tokens (`bridge` None: the same tokenizer).

    Losses are per sample and stay as they are. Rows of the result are float32, ids -1 /
    values -inf padding; ids at or past `dst_vocab_size` (the receiving model's logit width) are
    dropped, and a row left empty becomes a one-hot on its own token.
    """
    if len(knowledge) != len(src_examples) or len(src_examples) != len(dst_examples):
        raise ValueError("knowledge set and both encodings must cover the same samples")
    values = knowledge.values.astype(np.float32)
    if bridge is None:
        if any(
            s.input_ids[s.n_context :] != d.input_ids[d.n_context :]
            for s, d in zip(src_examples, dst_examples, strict=True)
        ):
            raise ValueError("without a bridge both encodings must have the same answer tokens")
        ids = knowledge.ids.astype(np.int64)
        lengths = knowledge.lengths
    else:
        offsets = knowledge.offsets
        out_ids, out_vals = [], []
        for i, (src, dst) in enumerate(zip(src_examples, dst_examples, strict=True)):
            rows = slice(offsets[i], offsets[i + 1])
            mapped_ids, mapped_vals = bridge.transfer(
                src.answer_ids, dst.answer_ids, knowledge.ids[rows], values[rows]
            )
            out_ids.append(mapped_ids)
            out_vals.append(mapped_vals.astype(np.float32))
        ids = np.concatenate(out_ids) if out_ids else np.zeros((0, knowledge.top_k), np.int64)
        values = np.concatenate(out_vals) if out_vals else np.zeros((0, knowledge.top_k), np.float32)
        lengths = np.asarray([d.n_target for d in dst_examples], dtype=np.int32)
    if dst_vocab_size is not None:
        outside = ids >= dst_vocab_size
        if outside.any():
            ids = np.where(outside, -1, ids)
            values = np.where(outside, -np.inf, values).astype(np.float32)
            targets = np.concatenate([np.asarray(d.input_ids[d.n_context :]) for d in dst_examples])
            empty = ~(ids >= 0).any(axis=1)
            ids[empty, 0] = targets[empty]
            values[empty, 0] = 0.0
    return KnowledgeSet(knowledge.loss.astype(np.float32), lengths, ids.astype(np.int32), values)


def dual_min_ce(client_losses: np.ndarray, own_loss: np.ndarray) -> np.ndarray:
    """DualMinCE: per sample the teacher with the lowest loss, kept only if below `own_loss`.

    `client_losses` [C, N] (NaN = no knowledge from that teacher), `own_loss` [N]. Returns the
    chosen teacher's row index per sample, -1 where no teacher beats the learner's own loss.
    """
    losses = np.asarray(client_losses, dtype=np.float64)
    if losses.ndim != 2 or losses.shape[1] != np.shape(own_loss)[0]:
        raise ValueError(f"client losses {losses.shape} must be [C, N] with N = {np.shape(own_loss)[0]}")
    filled = np.where(np.isfinite(losses), losses, np.inf)
    best = filled.argmin(axis=0)
    best_loss = filled[best, np.arange(losses.shape[1])]
    return np.where(best_loss < np.asarray(own_loss, dtype=np.float64), best, -1).astype(np.int64)


Teacher = tuple[np.ndarray, np.ndarray]
"""(ids [n_target, K], values [n_target, K]) for one example in the learner's vocabulary."""


def select_teachers(
    chosen: np.ndarray, sets: Sequence[KnowledgeSet], own: KnowledgeSet | None = None
) -> list[Teacher | None]:
    """Each sample's rows from the set DualMinCE chose for it.

    Where none was chosen: the learner's `own` rows if given (FATE-LLM's reference, whose
    'greater' strategy picks the best of the learner's own and the teachers' distributions),
    else None (no KD for that sample).
    """
    if own is not None and len(own) != len(chosen):
        raise ValueError(f"the learner's own set covers {len(own)} samples, not {len(chosen)}")
    return [
        (own.rows(i) if own is not None else None) if k < 0 else sets[k].rows(i)
        for i, k in enumerate(chosen.tolist())
    ]


@dataclass(frozen=True)
class KnowledgeTrainResult:
    steps: int
    mean_loss: float
    mean_ce: float
    mean_kd: float
    num_examples: int
    num_selected: int


def train_with_knowledge(
    model: PeftModel,
    examples: Sequence[Encoded],
    teachers: Sequence[Teacher | None],
    *,
    pad_id: int,
    lr: float,
    cfg: TrainConfig,
    epochs: int,
    ce_weight: float,
    temperature: float,
    seed: int,
    on_step: StepCallback | None = None,
    span: ScheduleSpan = ONE_ROUND,
) -> KnowledgeTrainResult:
    """Train the adapter with lambda*CE (every example) + (1-lambda)*KD (examples with a teacher).

    The KD term is `kd_loss_sparse` against the teacher's top-K rows at the example's answer
    positions, averaged over the batch's positions that have a teacher (0 when none has).
    `span`: the round of the run this is, for `train.lr_schedule = "whole_run"` (`optimise`).
    """
    if len(examples) != len(teachers) or not examples:
        raise ValueError("need one teacher entry (or None) per example, and at least one example")

    device = model_device(model)

    def loss_of(index: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        items = [examples[i] for i in index]
        batch = collate(items, pad_id, device=device)
        logits = target_logits(model, batch)
        ce = answer_cross_entropy(logits, batch)
        positions, t_ids, t_vals = [], [], []
        start = 0
        for i, item in zip(index, items, strict=True):
            teacher = teachers[i]
            if teacher is not None:
                if teacher[0].shape[0] != item.n_target:
                    raise ValueError(
                        f"teacher of example {i} has {teacher[0].shape[0]} rows for {item.n_target} tokens"
                    )
                positions.append(np.arange(start, start + item.n_target))
                t_ids.append(teacher[0])
                t_vals.append(teacher[1])
            start += item.n_target
        if positions:
            k = max(a.shape[1] for a in t_ids)
            ids = np.concatenate([_pad(a, k, -1) for a in t_ids]).astype(np.int64)
            vals = np.concatenate([_pad(a.astype(np.float32), k, -np.inf) for a in t_vals])
            rows = from_numpy(np.concatenate(positions), device)
            kd = kd_loss_sparse(logits[rows], from_numpy(ids, device), from_numpy(vals, device), temperature)
        else:
            kd = logits.sum() * 0.0
        return ce_weight * ce + (1.0 - ce_weight) * kd, ce, kd

    steps, means = optimise(
        [(model, lr)], len(examples), loss_of, cfg=cfg, epochs=epochs, seed=seed, on_step=on_step, span=span
    )
    return KnowledgeTrainResult(
        steps,
        float(means[0]),
        float(means[1]),
        float(means[2]),
        len(examples),
        sum(t is not None for t in teachers),
    )


def _pad(array: np.ndarray, k: int, fill: float) -> np.ndarray:
    if array.shape[1] == k:
        return array
    out = np.full((array.shape[0], k), fill, dtype=array.dtype)
    out[:, : array.shape[1]] = array
    return out


def dense_reference_bytes(num_samples: int, seq_len: int, top_k: int, bytes_per_entry: int = 8) -> int:
    """The paper's N*S*K knowledge-set size: K logits at every one of S positions of N samples.

    `bytes_per_entry` 8 = a float32 logit and an int32 token id per entry.
    """
    return num_samples * seq_len * top_k * bytes_per_entry
