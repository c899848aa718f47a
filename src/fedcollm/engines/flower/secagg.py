"""SecAgg+ for adapter uploads, both sides: settings derived, validated, run, and checked after.

Everything of the Flower engine that concerns SecAgg+ is here: the settings math and error bound,
Flower's server workflow (made to survive lost clients) and the client side, which holds its
trained adapter in the node state until the SecAgg+ stages ask for it.


Flower's SecAgg+ (legacy `SecAggPlusWorkflow` + client `secaggplus_mod`) sums integer vectors
under pairwise masks; each client first multiplies its parameters by `w = n / max_weight`, clips
them to [-clipping_range, clipping_range] and quantises them to `quantization_range` levels. Two
silent failure modes follow, both measured on this machine: a clipping range below the largest
|w * value| corrupts the mean (41% error seen), and sums above the modulus wrap around. Nothing
in Flower checks either. Here:

1. Each client trains first (message `train.local` with `hold`), keeps its adapter and its
   training metrics (train_loss, steps, ...) in its node state and reports its example count, a
   power-of-two bound on its adapter's largest |value|, its metrics' names and a power-of-two
   bound on their largest |value| (never the metrics themselves). The weight n its upload
   carries is `upload_weight` of its example count (`federation.weighting`: the count itself,
   or 1 for uniform weighting), as in the server's plain mean; both sides derive it from the
   same experiment.
2. `derive_settings` picks max_weight = the largest weight, clipping_range = the largest
   w_k * bound_k (so nothing is ever clipped) and the largest quantisation range that cannot
   overflow the modulus; explicit settings are validated against the same limits. It also picks
   the metric scale, which maps every client's metrics into the clipping range.
3. SecAgg+ runs; each client's masked vector is its adapter plus one entry per metric (times the
   metric scale), so the server receives only the weighted mean of both: the weighted
   mean of each metric over the clients in the aggregate, and nothing per client
   (`split_metrics`).
4. `error_bound` gives a guaranteed bound on the quantisation error of that mean; an aggregate
   whose bound exceeds the tolerance (relative, L2) is refused, naming the setting to change.
   `metric_error_bound` bounds the error of the metric means the same way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from logging import WARNING
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitRes, Parameters, Status, ndarray_to_bytes
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from fedcollm.engines.flower import records
from fedcollm.engines.flower.options import FlowerEngineError, FlowerOptions
from fedcollm.protocol import Arrays

if TYPE_CHECKING:
    from flwr.serverapp import Grid

HELD_ARRAYS = "fedcollm.held"
"""Node-state record of the adapter a client holds for SecAgg+ (float32, decoded from the wire)."""
HELD_META = "fedcollm.held.meta"
"""Node-state record of the held adapter's round and weight, and the held metrics."""
METRIC_SCALE = "fedcollm.metric-scale"
"""SecAgg+ request config entry: the factor every client multiplies its held metrics by."""


class SecAggSettingsError(FlowerEngineError):
    """SecAgg+ settings that would corrupt or lose the aggregate."""


class SecAggUploadError(FlowerEngineError, ValueError):
    """An adapter a client must not upload through SecAgg+ (e.g. NaN or infinite values)."""


@dataclass(frozen=True)
class ClientStats:
    """What a client discloses in plain before SecAgg+: its weight and magnitude bounds."""

    node_id: int
    client: int
    weight: int
    """The weight its upload carries (`upload_weight`: its example count, or 1 when uniform)."""
    bound: float
    metrics_bound: float = 0.0
    """A power of two above the largest |value| of its held metrics (0: it holds none)."""


@dataclass(frozen=True)
class HeldUpload:
    """What `hold` lets the server know of what a client holds for SecAgg+ (`train.local`'s reply)."""

    names: list[str]
    """The adapter's array names, in upload order."""
    bound: float
    """A power of two above the adapter's largest |value|."""
    metric_names: list[str]
    """The held metrics' names, in upload order (their values stay on the client)."""
    metrics_bound: float
    """A power of two above the held metrics' largest |value| (0 without metrics)."""


@dataclass(frozen=True)
class SecAggSettings:
    """One round's SecAgg+ parameters, and the numbers the error bound needs."""

    clipping_range: float
    quantization_range: int
    modulus_range: int
    max_weight: float
    num_shares: int | float
    threshold: int | float
    weights: tuple[float, ...]
    """Each client's effective weight q_ratio / quantization_range, as SecAgg+ applies it."""
    exact_weights: tuple[float, ...]
    """Each client's exact weight n / max_weight (what the server's plain mean would use)."""
    bounds: tuple[float, ...]
    """Each client's reported magnitude bound."""
    metrics_bound: float = 0.0
    """The largest reported metrics bound (0: the clients hold no metrics)."""
    metric_scale: float = 0.0
    """Factor every client multiplies its metrics by: clipping_range / (metrics_bound * max weight)."""

    @property
    def step(self) -> float:
        """Width of one quantisation level in parameter units (before dividing by the weights)."""
        return 2 * self.clipping_range / self.quantization_range


def effective_weight(weight: int, max_weight: float, quantization_range: int) -> float:
    """The weight SecAgg+ really applies: w = n / max_weight rounded to 1 / quantization_range."""
    return round(weight / max_weight * quantization_range) / quantization_range


def derive_settings(stats: Sequence[ClientStats], options: FlowerOptions) -> SecAggSettings:
    """SecAgg+ parameters for these clients, from their upload weights and magnitude bounds."""
    if len(stats) < 2:
        raise SecAggSettingsError(f"SecAgg+ needs at least 2 clients in a round, got {len(stats)}")
    k = len(stats)
    modulus = options.secagg_modulus_range
    largest = max(s.weight for s in stats)
    if largest <= 0:
        raise SecAggSettingsError("every client reported zero training examples (zero weight)")
    max_weight = options.secagg_max_weight or float(largest)

    # Each client's masked vector holds values in [0, Q] plus its weight factor q_ratio; the
    # server sums K of them modulo M, so K * max(Q, q_ratio) must stay below M. (Flower's
    # stochastic rounding also casts to int32, so Q <= 2**30.)
    heaviest = largest / max_weight
    if options.secagg_quantization_range:
        q_range = options.secagg_quantization_range
        worst = k * q_range * max(1.0, heaviest)
        if worst >= modulus:
            raise SecAggSettingsError(
                f"secagg-quantization-range={q_range} with {k} clients (max weight ratio "
                f"{heaviest:.3g}) can reach {worst:.3g} >= secagg-modulus-range={modulus}: the "
                f"masked sum would wrap around. Lower secagg-quantization-range below "
                f"{modulus / (k * max(1.0, heaviest)):.0f} (or set it to 0 to derive it)"
                + (", or raise secagg-max-weight" if heaviest > 1 else "")
            )
    else:
        limit = (modulus - 1) / (k * max(1.0, heaviest))
        q_range = 2 ** min(30, math.floor(math.log2(limit)))
        if q_range < 2**8:
            raise SecAggSettingsError(
                f"{k} clients leave only {q_range} quantisation levels under modulus {modulus}; "
                "raise secagg-max-weight or use fewer clients per round"
            )
    if q_range > 2**30:
        raise SecAggSettingsError(
            f"secagg-quantization-range={q_range} exceeds 2**30, the int32 range Flower's "
            "quantiser rounds into; lower it (or set it to 0 to derive it)"
        )

    weights = tuple(effective_weight(s.weight, max_weight, q_range) for s in stats)
    for s, w in zip(stats, weights, strict=True):
        if w <= 0:
            raise SecAggSettingsError(
                f"client {s.client}'s weight {s.weight}/{max_weight:g} rounds to zero at "
                f"quantisation range {q_range}: lower secagg-max-weight (or set it to 0)"
            )
    needed = max(s.bound * w for s, w in zip(stats, weights, strict=True)) * (1 + 2**-20)
    if options.secagg_clipping_range:
        clipping = options.secagg_clipping_range
        if clipping < needed:
            raise SecAggSettingsError(
                f"secagg-clipping-range={clipping:g} is below {needed:.6g}, the largest "
                "weighted adapter value a client reported: SecAgg+ would clip the uploads and "
                "silently corrupt the mean. Raise secagg-clipping-range to at least "
                f"{needed:.6g} (or set it to 0 to derive it)"
            )
    else:
        clipping = needed
    # Metrics ride along as extra entries of the masked vector. Scaled by s, client k's entries
    # reach w_k * |m_k| * s < w_k * B * s <= clipping_range: never clipped, whatever the
    # adapter's bound, and using the whole quantisation range.
    metrics_bound = max(s.metrics_bound for s in stats)
    metric_scale = clipping / (metrics_bound * max(weights)) if metrics_bound > 0 else 0.0
    return SecAggSettings(
        clipping_range=float(clipping),
        quantization_range=int(q_range),
        modulus_range=int(modulus),
        max_weight=float(max_weight),
        num_shares=_share_count(options.secagg_num_shares),
        threshold=_share_count(options.secagg_threshold),
        weights=weights,
        exact_weights=tuple(s.weight / max_weight for s in stats),
        bounds=tuple(s.bound for s in stats),
        metrics_bound=float(metrics_bound),
        metric_scale=float(metric_scale),
    )


def _share_count(value: float) -> int | float:
    """Run config numbers arrive as floats; whole numbers above 1 mean counts, as in Flower."""
    if value > 1 and float(value).is_integer():
        return int(value)
    return float(value)


def error_bound(settings: SecAggSettings, num_params: int) -> float:
    """A guaranteed bound on the L2 error of the securely aggregated mean.

    Every client's stochastic rounding is off by less than one level (`step`) per value; the
    server divides the sum of K such errors by the sum of the weights. On top, the weights are
    themselves rounded to 1 / quantization_range, which shifts the mean by at most the change
    in each normalised weight times that client's magnitude bound.
    """
    k = len(settings.weights)
    total, exact_total = sum(settings.weights), sum(settings.exact_weights)
    rounding = k * settings.step / total
    reweighting = sum(
        abs(w / total - e / exact_total) * b
        for w, e, b in zip(settings.weights, settings.exact_weights, settings.bounds, strict=True)
    )
    # (1 + 1e-6): float64 arithmetic in the quantiser, ~1e-7 of a level at 2**30 levels.
    return (rounding * (1 + 1e-6) + reweighting) * math.sqrt(num_params)


def metric_error_bound(settings: SecAggSettings) -> float:
    """A guaranteed bound on the absolute error of each securely aggregated metric mean.

    As `error_bound`, per entry, in metric units: the rounding error of K clients divided by the
    sum of the weights and by the metric scale, plus the shift from rounding the weights (against
    the exact weighted mean), at most the change in each normalised weight times the
    largest metrics bound.
    """
    if settings.metric_scale <= 0:
        return 0.0
    k = len(settings.weights)
    total, exact_total = sum(settings.weights), sum(settings.exact_weights)
    rounding = k * settings.step / total / settings.metric_scale
    reweighting = sum(
        abs(w / total - e / exact_total) * settings.metrics_bound
        for w, e in zip(settings.weights, settings.exact_weights, strict=True)
    )
    return rounding * (1 + 1e-6) + reweighting


def check_aggregate(settings: SecAggSettings, aggregate: dict[str, np.ndarray], tolerance: float) -> float:
    """Relative error bound of `aggregate`; raises if it exceeds `tolerance`."""
    num_params = sum(int(a.size) for a in aggregate.values())
    norm = math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in aggregate.values()))
    bound = error_bound(settings, num_params)
    relative = bound / norm if norm > 0 else math.inf
    if not relative <= tolerance:
        raise SecAggSettingsError(
            f"the securely aggregated adapter may be off by {relative:.3g} (relative L2), above "
            f"secagg-tolerance={tolerance:g}: refusing it. Raise secagg-quantization-range "
            f"(now {settings.quantization_range}; at most modulus / clients), or lower "
            f"secagg-clipping-range (now {settings.clipping_range:.4g}) or secagg-max-weight "
            f"(now {settings.max_weight:g}) toward the derived values (set them to 0)"
        )
    return relative


# ------------------------------------------------------------------------------------------
# The server side: Flower's workflow


def _restrict(settings: SecAggSettings, stats: list[ClientStats], kept: list[ClientStats]) -> SecAggSettings:
    index = [stats.index(s) for s in kept]
    return replace(
        settings,
        weights=tuple(settings.weights[i] for i in index),
        exact_weights=tuple(settings.exact_weights[i] for i in index),
        bounds=tuple(settings.bounds[i] for i in index),
    )


def _secaggplus_workflow() -> type:
    from flwr.server.workflow import SecAggPlusWorkflow

    class DropoutSafe(SecAggPlusWorkflow):
        """Flower 1.42's SecAgg+ workflow, made to survive clients lost before sharing their keys.

        Flower's unmask stage asks the survivors for key shares of *every* client sampled at
        setup, so a client that died before the share-keys stage (it has no shares anywhere,
        and nobody masked against it) makes the surviving clients fail (they hold no share of
        it) and the round halt; and for a client lost during the upload it cancels masks
        toward all its original neighbours, not only those that applied them. Here, once keys
        are shared, only the clients that shared them count as sampled, each one's neighbours
        are those that shared keys too, and a client lost during the upload has its masks
        cancelled only toward the neighbours that uploaded. The client side is unchanged.
        """

        shared: set[int] | None = None

        def _check_threshold(self, state):
            relevant = self.shared if self.shared is not None else state.active_node_ids
            for node in relevant:
                if len(state.nid_to_neighbours[node] & state.active_node_ids) < state.threshold:
                    return False
            return True

        def share_keys_stage(self, grid, context, state):
            ok = super().share_keys_stage(grid, context, state)
            self.shared = set(state.active_node_ids)
            return ok and self._check_threshold(state)

        def unmask_stage(self, grid, context, state):
            shared, uploaded = self.shared or set(), state.active_node_ids
            state.sampled_node_ids = set(shared)
            for node in shared:
                neighbours = state.nid_to_neighbours[node] & shared
                if node not in uploaded:
                    neighbours = (neighbours & uploaded) | {node}
                state.nid_to_neighbours[node] = neighbours
            return super().unmask_stage(grid, context, state)

    return DropoutSafe


def run_secagg(
    grid: Grid,
    stats: list[ClientStats],
    settings: SecAggSettings,
    rnd: int,
    options: FlowerOptions,
) -> tuple[list[np.ndarray], set[int]]:
    """Run Flower's SecAgg+ workflow over the nodes in `stats`; return the mean and who is in it.

    The clients upload the adapters they hold from `train.local` (and after them, where they
    hold metrics, one more array: the metrics times `settings.metric_scale`); the server-side
    workflow unmasks only their weighted sum, divided by the sum of weights. `split_metrics`
    takes the metric means off the result.
    """
    from flwr.app import ArrayRecord, Context
    from flwr.common import FitIns, Parameters, parameters_to_ndarrays
    from flwr.server import ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import Strategy
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    class Capture(Strategy):
        """Hands the workflow its clients and keeps the aggregate it unmasks."""

        def __init__(self) -> None:
            self.aggregate: list[np.ndarray] | None = None
            self.included: set[int] = set()

        def configure_fit(self, server_round, parameters, client_manager):
            empty = Parameters(tensors=[], tensor_type="numpy.ndarray")
            config: dict[str, bool | bytes | float | int | str] = {
                "round": rnd,
                METRIC_SCALE: settings.metric_scale,
            }
            return [(GridClientProxy(s.node_id, grid, grid.run.run_id), FitIns(empty, config)) for s in stats]

        def aggregate_fit(self, server_round, results, failures):
            if results:
                self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
                self.included = {proxy.node_id for proxy, _ in results}
            return None, {}

        def initialize_parameters(self, client_manager):
            return None

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    strategy = Capture()
    base = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(
        base,
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
        client_manager=SimpleClientManager(),
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = _secaggplus_workflow()(
        num_shares=settings.num_shares,
        reconstruction_threshold=settings.threshold,
        max_weight=settings.max_weight,
        clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range,
        modulus_range=settings.modulus_range,
        timeout=options.secagg_timeout or None,
    )
    flwr_logger = logging.getLogger("flwr")
    previous = flwr_logger.level
    if not options.verbose:
        flwr_logger.setLevel(WARNING)
    try:
        workflow(grid, context)
    finally:
        flwr_logger.setLevel(previous)
    if strategy.aggregate is None:
        raise FlowerEngineError(
            f"round {rnd}: SecAgg+ halted before unmasking (too few clients left to reach the "
            f"reconstruction threshold {settings.threshold}); lower secagg-threshold or keep "
            "more SuperNodes running"
        )
    return strategy.aggregate, strategy.included


def split_metrics(
    settings: SecAggSettings, mean: list[np.ndarray], metric_names: Sequence[str]
) -> tuple[list[np.ndarray], dict[str, float]]:
    """The unmasked mean's adapter arrays, and its last array read back as the metric means.

    Each metric's value is the weighted mean over the clients in the aggregate, with the
    adapter's weights (`federation.weighting`: by example count, or uniform) (within
    `metric_error_bound`); no single client's value can be recovered from it.
    """
    if not metric_names:
        return mean, {}
    if not mean or np.shape(mean[-1]) != (len(metric_names),) or settings.metric_scale <= 0:
        raise FlowerEngineError(
            f"the SecAgg+ aggregate holds no metric entries for {list(metric_names)} (client and server "
            "disagree on the upload layout)"
        )
    values = np.asarray(mean[-1], dtype=np.float64) / settings.metric_scale
    return mean[:-1], {name: float(v) for name, v in zip(metric_names, values, strict=True)}


def finish_mean(
    settings: SecAggSettings,
    stats: list[ClientStats],
    included: set[int],
    mean: list[np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    tolerance: float,
) -> tuple[Arrays, SecAggSettings, float]:
    """The unmasked mean as named float32 arrays, the settings of the clients in it, and its error.

    With fewer clients than planned the weights (and so the error bound) change; an aggregate
    whose relative error bound exceeds `tolerance` is refused (`check_aggregate`).
    """
    aggregate = {
        name: np.asarray(array, dtype=np.float32).reshape(shape)
        for (name, shape), array in zip(shapes.items(), mean, strict=True)
    }
    kept = [s for s in stats if s.node_id in included]
    if len(kept) != len(stats):
        settings = _restrict(settings, stats, kept)
    return aggregate, settings, check_aggregate(settings, aggregate, tolerance)


# ------------------------------------------------------------------------------------------
# The client side


def magnitude_bound(arrays: Mapping[str, np.ndarray], what: str = "the adapter") -> float:
    """The smallest power of two strictly greater than every |value| (>= 2**-40).

    Clients report this instead of their exact maximum so the server learns only the binary
    order of magnitude of an adapter (or of metrics) it is not allowed to see.
    """
    peak = max((float(np.max(np.abs(a))) for a in arrays.values() if a.size), default=0.0)
    if not math.isfinite(peak):
        raise SecAggUploadError(f"{what} holds NaN or infinite values; refusing to upload it")
    return 2.0 ** max(-40, math.floor(math.log2(peak)) + 1) if peak > 0 else 2.0**-40


def hold(
    context: Context,
    rnd: int,
    adapter: Arrays,
    weight: int,
    metrics: Mapping[str, float] | None = None,
) -> HeldUpload:
    """Keep a trained adapter and its metrics in the node state for SecAgg+; return what to disclose.

    The adapter is held decoded from the transport dtype: SecAgg+ quantises float values itself,
    and a bfloat16 upload is a uint16 bit pattern it must not take for numbers. The metrics
    (train_loss, steps, ...) are held too: they leave the node only inside the masked vector.
    `weight` is what SecAgg+ scales the upload by (`fedcollm.federation.aggregate.upload_weight`
    of the example count, as the server's `ClientStats` has it).
    """
    metrics = dict(metrics or {})
    values = np.array([float(v) for v in metrics.values()], dtype=np.float64)
    metrics_bound = magnitude_bound({"metrics": values}, "the training metrics") if metrics else 0.0
    context.state[HELD_ARRAYS] = records.to_array_record(adapter)
    context.state[HELD_META] = ConfigRecord(
        {
            "round": rnd,
            "weight": weight,
            "metric_names": list(metrics),
            "metric_values": [float(v) for v in values],
        }
    )
    return HeldUpload(list(adapter), magnitude_bound(adapter), list(metrics), metrics_bound)


def _held_metrics(meta: ConfigRecord) -> np.ndarray:
    names, values = meta.get("metric_names", []), meta.get("metric_values", [])
    if not isinstance(names, list) or not isinstance(values, list) or len(names) != len(values):
        raise FlowerEngineError("the node state holds malformed metrics for SecAgg+")
    return np.array([float(v) for v in values], dtype=np.float64)


def masked_upload(msg: Message, context: Context) -> Message:
    """SecAgg+'s 'collect masked vectors' stage: hand the held adapter to `secaggplus_mod` to mask.

    The mod answers the other stages itself; it calls the ClientApp only to get the vector to
    quantise and mask, so the held adapter is read here and dropped from the node state. The
    held metrics are appended as one more array (times the request's metric scale); the reply
    carries no metric in plain (`metrics={}`: the mod forwards this reply's records to the
    server, clearing only its arrays).
    """
    if HELD_ARRAYS not in context.state.array_records:
        raise FlowerEngineError(
            "SecAgg+ asked for an upload but this node holds no trained adapter (a "
            "train.local message with hold must come first)"
        )
    held = records.from_array_record(context.state.array_records[HELD_ARRAYS])
    meta = context.state.config_records[HELD_META]
    del context.state[HELD_ARRAYS], context.state[HELD_META]
    config = recorddict_to_fitins(msg.content, keep_input=True).config
    asked = config.get("round")
    held_round = int(records.number(meta, "round"))
    if asked is not None and int(asked) != held_round:
        raise FlowerEngineError(f"SecAgg+ round {asked!r} asked for the adapter of round {held_round}")
    # float64: SecAgg+ scales and quantises in the arrays' own precision, and float32 would lose
    # several quantisation levels per value at 2**30 levels.
    tensors = [ndarray_to_bytes(a.astype(np.float64)) for a in held.values()]
    metrics = _held_metrics(meta)
    if metrics.size:
        # The metrics travel as one more masked array; the server unmasks only their weighted mean.
        scale = config.get(METRIC_SCALE)
        if not isinstance(scale, int | float) or not scale > 0:
            raise FlowerEngineError(
                f"SecAgg+ asked for the upload without a metric scale ({METRIC_SCALE}={scale!r}), but this "
                "node holds training metrics, which must not leave it unmasked"
            )
        tensors.append(ndarray_to_bytes(metrics * float(scale)))
    fitres = FitRes(
        status=Status(code=Code.OK, message="held adapter"),
        parameters=Parameters(tensors=tensors, tensor_type="numpy.ndarray"),
        num_examples=int(records.number(meta, "weight")),  # SecAgg+ scales the upload by it
        metrics={},
    )
    return Message(fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
