"""SecAgg+ settings: derived from the adapters and example counts, validated, error-bounded.

These tests run Flower's own quantisation arithmetic (the masks cancel in the sum, so they are
left out) on adapter-like arrays, without processes or Ray.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_multiply,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedcollm.engines.flower.options import FlowerOptions
from fedcollm.engines.flower.records import TrainRequest, TrainResult
from fedcollm.engines.flower.secagg import (
    ClientStats,
    SecAggSettings,
    SecAggSettingsError,
    check_aggregate,
    derive_settings,
    error_bound,
    magnitude_bound,
    metric_error_bound,
    split_metrics,
)


def flower_secure_mean(
    uploads: list[list[np.ndarray]], counts: list[int], settings: SecAggSettings
) -> list[np.ndarray]:
    """What SecAgg+ hands the server: Flower 1.41's client and server arithmetic, unmasked."""
    total: list[np.ndarray] | None = None
    for params, n in zip(uploads, counts, strict=True):
        # secaggplus_mod._collect_masked_vectors
        q_ratio = round(n / settings.max_weight * settings.quantization_range)
        scaled = parameters_multiply(params, q_ratio / settings.quantization_range)
        quantised = factor_combine(
            q_ratio, quantize(scaled, settings.clipping_range, settings.quantization_range)
        )
        quantised = [np.asarray(a, dtype=np.int64) for a in quantised]
        total = quantised if total is None else parameters_addition(total, quantised)
    assert total is not None
    # SecAggPlusWorkflow.unmask_stage
    total = parameters_mod(total, settings.modulus_range)
    q_total, total = factor_extract(total)
    mean = dequantize(total, settings.clipping_range, settings.quantization_range)
    offset = -(len(uploads) - 1) * settings.clipping_range
    return [(v + offset) * (settings.quantization_range / q_total) for v in mean]


def adapters(k: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """LoRA-like uploads: A ~ kaiming-uniform scale, B small (it starts at zero)."""
    rng = np.random.default_rng(seed)
    return [
        {
            "a": rng.uniform(-0.35, 0.35, (8, 64)).astype(np.float32),
            "b": rng.normal(0, 2e-3, (64, 8)).astype(np.float32),
        }
        for _ in range(k)
    ]


def plain_mean(uploads: list[dict[str, np.ndarray]], counts: list[int]) -> dict[str, np.ndarray]:
    total = sum(counts)
    return {
        name: sum(u[name].astype(np.float64) * n / total for u, n in zip(uploads, counts, strict=True))
        for name in uploads[0]
    }


def relative(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    num = math.sqrt(sum(float(np.sum((a[k] - b[k]) ** 2)) for k in a))
    return num / math.sqrt(sum(float(np.sum(b[k] ** 2)) for k in b))


def stats_for(uploads: list[dict[str, np.ndarray]], counts: list[int]) -> list[ClientStats]:
    return [
        ClientStats(100 + i, i, n, magnitude_bound(u))
        for i, (u, n) in enumerate(zip(uploads, counts, strict=True))
    ]


def secure_mean(uploads, counts, settings) -> dict[str, np.ndarray]:
    names = list(uploads[0])
    # The ClientApp hands SecAgg+ float64 arrays (see secagg.masked_upload).
    out = flower_secure_mean([[u[n].astype(np.float64) for n in names] for u in uploads], counts, settings)
    return dict(zip(names, out, strict=True))


@pytest.mark.parametrize("counts", [[6, 6, 6], [3, 40, 11], [1, 1000]])
def test_derived_settings_match_plain_fedavg_within_the_bound(counts: list[int]) -> None:
    uploads = adapters(len(counts))
    settings = derive_settings(stats_for(uploads, counts), FlowerOptions(secagg=True))
    # Nothing can be clipped, and the masked sum cannot wrap around the modulus.
    assert settings.clipping_range >= max(
        magnitude_bound(u) * w for u, w in zip(uploads, settings.weights, strict=True)
    )
    assert len(counts) * settings.quantization_range * max(1, max(counts) / settings.max_weight) < 2**32
    got, want = secure_mean(uploads, counts, settings), plain_mean(uploads, counts)
    err = math.sqrt(sum(float(np.sum((got[k] - want[k]) ** 2)) for k in got))
    assert err <= error_bound(settings, sum(a.size for a in uploads[0].values()))
    assert relative(got, want) < 1e-5
    assert check_aggregate(settings, got, 1e-3) < 1e-3


@pytest.mark.parametrize("counts", [[6, 6, 6], [3, 40, 11], [1, 1000]])
def test_metrics_ride_in_the_masked_vector_and_unmask_as_their_weighted_mean(counts: list[int]) -> None:
    # Each client's train_loss and steps are appended to its masked vector, scaled into the
    # clipping range: the server gets back only their example-weighted means, within the bound,
    # and the adapter's clipping range (so its precision) is what it was without them.
    uploads = adapters(len(counts))
    metrics = [np.array([0.5 + 1.7 * k, 13.0 + 29 * k]) for k in range(len(counts))]  # loss, steps
    stats = [
        ClientStats(100 + i, i, n, magnitude_bound(u), magnitude_bound({"m": m}))
        for i, (u, n, m) in enumerate(zip(uploads, counts, metrics, strict=True))
    ]
    settings = derive_settings(stats, FlowerOptions(secagg=True))
    assert (
        settings.clipping_range
        == derive_settings(stats_for(uploads, counts), FlowerOptions(secagg=True)).clipping_range
    )
    names = list(uploads[0])
    vectors = [
        [u[n].astype(np.float64) for n in names] + [m * settings.metric_scale]
        for u, m in zip(uploads, metrics, strict=True)
    ]
    mean = flower_secure_mean(vectors, counts, settings)
    adapter_mean, got = split_metrics(settings, mean, ["train_loss", "steps"])
    assert len(adapter_mean) == len(names)
    total = sum(counts)
    for i, key in enumerate(["train_loss", "steps"]):
        want = sum(m[i] * n for m, n in zip(metrics, counts, strict=True)) / total
        assert abs(got[key] - want) <= metric_error_bound(settings)
    assert metric_error_bound(settings) < 1e-4
    # The adapter mean is unaffected by the metrics riding along.
    assert relative(dict(zip(names, adapter_mean, strict=True)), plain_mean(uploads, counts)) < 1e-5


def test_too_small_clipping_range_is_refused_not_silently_corrupting() -> None:
    counts = [6, 6, 6]
    uploads = adapters(3)
    options = FlowerOptions(secagg=True, secagg_clipping_range=0.05)
    with pytest.raises(SecAggSettingsError, match="secagg-clipping-range"):
        derive_settings(stats_for(uploads, counts), options)
    # What Flower itself would have produced with that setting: a badly wrong mean.
    derived = derive_settings(stats_for(uploads, counts), FlowerOptions(secagg=True))
    clipped = SecAggSettings(**{**derived.__dict__, "clipping_range": 0.05})
    assert relative(secure_mean(uploads, counts, clipped), plain_mean(uploads, counts)) > 0.1


def test_overflowing_quantization_range_is_refused() -> None:
    uploads = adapters(3)
    with pytest.raises(SecAggSettingsError, match="secagg-quantization-range"):
        derive_settings(
            stats_for(uploads, [5, 5, 5]), FlowerOptions(secagg=True, secagg_quantization_range=2**31)
        )


def test_coarse_quantisation_aggregate_is_refused_naming_the_setting() -> None:
    counts = [4, 9, 5]
    uploads = adapters(3)
    settings = derive_settings(
        stats_for(uploads, counts), FlowerOptions(secagg=True, secagg_quantization_range=2**6)
    )
    got = secure_mean(uploads, counts, settings)
    with pytest.raises(SecAggSettingsError, match=r"secagg-quantization-range \(now 64"):
        check_aggregate(settings, got, 1e-3)


def test_oversized_max_weight_degrades_precision_but_stays_bounded() -> None:
    # Flower's default max_weight=1000 with a handful of examples: weights of ~0.005 waste
    # quantisation levels; the bound reflects it and the check still catches real trouble.
    counts = [5, 6, 7]
    uploads = adapters(3)
    settings = derive_settings(
        stats_for(uploads, counts), FlowerOptions(secagg=True, secagg_max_weight=1000.0)
    )
    got = secure_mean(uploads, counts, settings)
    assert relative(got, plain_mean(uploads, counts)) <= check_aggregate(settings, got, 1e-3)


def test_magnitude_bound_is_the_next_power_of_two() -> None:
    assert magnitude_bound({"x": np.array([0.3, -0.7], np.float32)}) == 1.0
    assert magnitude_bound({"x": np.array([0.5], np.float32)}) == 1.0
    assert magnitude_bound({"x": np.array([3.0], np.float32)}) == 4.0
    with pytest.raises(ValueError, match="NaN"):
        magnitude_bound({"x": np.array([np.nan], np.float32)})


def test_secagg_needs_two_clients() -> None:
    with pytest.raises(SecAggSettingsError, match="at least 2"):
        derive_settings([ClientStats(1, 0, 5, 1.0)], FlowerOptions(secagg=True))
    with pytest.raises(ValueError, match="min-clients"):
        FlowerOptions(secagg=True, min_clients=1)


def test_options_from_run_config() -> None:
    options = FlowerOptions.from_run_config(
        {"secagg": "true", "min-clients": 3, "secagg-tolerance": 1e-4, "experiment": "x.toml"}
    )
    assert options.secagg and options.min_clients == 3 and options.secagg_tolerance == 1e-4
    assert FlowerOptions.from_run_config(options.to_run_config()) == options
    with pytest.raises(ValueError, match="secagg-modulus-range"):
        FlowerOptions(secagg_modulus_range=3)


def test_messages_round_trip_bit_exact() -> None:
    arrays = adapters(1)[0]
    request = TrainRequest(rnd=2, experiment="name = 'x'\n", arrays=arrays, config={"round": 2}, hold=True)
    back = TrainRequest.from_record(request.to_record())
    assert back.rnd == 2 and back.hold and back.experiment == request.experiment
    assert list(back.arrays) == list(arrays)
    assert all(
        np.array_equal(back.arrays[k], arrays[k]) and back.arrays[k].dtype == np.float32 for k in arrays
    )
    result = TrainResult(client=1, num_examples=7, metrics={"train_loss": 0.5}, names=["a", "b"], bound=0.5)
    back_result = TrainResult.from_record(result.to_record())
    assert back_result == result


# ------------------------------------------------------------------------------------------
# The SecAgg+ protocol end to end, in process: the real ClientApp (secaggplus_mod and the held
# adapter) answers the real server workflow through a grid that can lose a node at any stage.


def _over_the_wire(message):  # type: ignore[no-untyped-def]
    """A copy of `message` as a SuperNode receives it (arrays included, which deepcopy cannot copy)."""
    from flwr.common.serde import message_from_proto, message_to_proto

    if not message.content.array_records:
        return copy.deepcopy(message)
    return message_from_proto(message_to_proto(message))


class LossyGrid:
    """Delivers messages to in-process ClientApps; a node dies when it gets a given stage.

    `seen` keeps every reply, as the server received it.
    """

    def __init__(self, contexts: dict, die_at: dict[int, str]) -> None:
        from types import SimpleNamespace

        from fedcollm.engines.flower.client_app import app

        self.app = app
        self.contexts = contexts
        self.die_at = die_at
        self.dead: set[int] = set()
        self.replies: dict[str, object] = {}
        self.seen: list = []
        self.run = SimpleNamespace(run_id=1)

    def get_node_ids(self) -> list[int]:
        return [n for n in self.contexts if n not in self.dead]

    def push_messages(self, messages) -> list[str]:  # type: ignore[no-untyped-def]
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            ids.append(message.metadata.message_id)
            node = message.metadata.dst_node_id
            configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
            stage = configs[Key.STAGE] if configs is not None else message.metadata.message_type
            if node in self.dead or self.die_at.get(node) == stage:
                self.dead.add(node)
                continue
            # A copy, as over a network: the workflow reuses one content object for all nodes.
            reply = self.app(message=_over_the_wire(message), context=self.contexts[node])
            self.replies[message.metadata.message_id] = reply
            self.seen.append(reply)
        return ids

    def pull_messages(self, ids) -> list:  # type: ignore[no-untyped-def]
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def secagg_round(monkeypatch: pytest.MonkeyPatch, config, replies):  # type: ignore[no-untyped-def]
    """One SecAgg+ round, one client per reply, through the transport and the real ClientApp, with the
    algorithm's client_fit stubbed to return client k's `replies[k]`: (transport, grid, result)."""
    from types import SimpleNamespace

    from flwr.app import Context, RecordDict

    from fedcollm.engines.flower import client_work
    from fedcollm.engines.flower.transport import FlowerTransport
    from fedcollm.protocol import Payload

    def local_fit(hook, request, node_config):  # type: ignore[no-untyped-def]
        """The algorithm's client_fit as far as the transport sees it: an adapter and metrics."""
        k = int(node_config["partition-id"])
        algorithm = SimpleNamespace(from_wire=lambda arrays: arrays, config=config)
        return algorithm, replies[k]

    monkeypatch.setattr(client_work, "run_hook", local_fit)
    contexts = {
        100 + k: Context(
            run_id=1,
            node_id=100 + k,
            node_config={"partition-id": k, "num-partitions": len(replies)},
            state=RecordDict(),
            run_config={},
        )
        for k in range(len(replies))
    }
    grid = LossyGrid(contexts, {})
    options = FlowerOptions(secagg=True, node_worker=False)  # the stubbed client_fit runs here
    transport = FlowerTransport(grid, config, options)  # type: ignore[arg-type]
    transport.connect()
    start = {name: np.zeros_like(array) for name, array in replies[0].arrays.items()}
    return transport, grid, transport.fit_aggregate(Payload(start, {"round": 1}), 1)


@pytest.mark.parametrize("stage", [None, "setup", "share_keys", "collect_masked_vectors", "unmask"])
def test_secagg_survives_a_client_lost_at_any_stage(stage: str | None, server_identity: None) -> None:
    from flwr.app import Context, RecordDict

    from fedcollm.engines.flower.secagg import hold, run_secagg
    from fedcollm.engines.flower.transport import PollingGrid

    counts = [5, 9, 7, 6, 8]
    uploads = adapters(len(counts), seed=3)
    contexts = {}
    for k, (upload, n) in enumerate(zip(uploads, counts, strict=True)):
        context = Context(run_id=1, node_id=100 + k, node_config={}, state=RecordDict(), run_config={})
        hold(context, 1, upload, n)
        contexts[100 + k] = context
    options = FlowerOptions(secagg=True, secagg_threshold=0.6)
    stats = stats_for(uploads, counts)
    settings = derive_settings(stats, options)
    grid = LossyGrid(contexts, {} if stage is None else {102: stage})
    mean, included = run_secagg(PollingGrid(grid, interval=0.0), stats, settings, 1, options)  # type: ignore[arg-type]

    # Lost before uploading: left out. Lost while unmasking: its upload is already in the sum.
    lost_before_upload = stage in ("setup", "share_keys", "collect_masked_vectors")
    assert included == {100 + k for k in range(5)} - ({102} if lost_before_upload else set())
    kept = [k for k in range(5) if 100 + k in included]
    want = plain_mean([uploads[k] for k in kept], [counts[k] for k in kept])
    got = dict(zip(list(uploads[0]), mean, strict=True))
    assert relative(got, want) < 1e-6


def test_a_secagg_round_shows_the_server_no_clients_metrics_only_their_mean(
    server_identity: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole SecAgg+ round through the transport and the real ClientApp (training stubbed out):
    no message the server receives holds a client's train_loss or steps, and the round returns
    their example-weighted means, unmasked from the vectors the clients masked."""
    from flwr.common import bytes_to_ndarray

    from fedcollm.config import build_config
    from fedcollm.protocol import ClientReply

    counts = [5, 9, 7]
    uploads = adapters(3, seed=4)
    losses, steps = [2.718281828, 1.414213562, 3.141592653], [41.0, 43.0, 47.0]
    secret = losses + steps
    replies = [
        ClientReply(k, uploads[k], counts[k], {"train_loss": losses[k], "steps": steps[k]}) for k in range(3)
    ]
    config = build_config({"algorithm": "fedavg", "federation": {"num_clients": 3}})
    transport, grid, result = secagg_round(monkeypatch, config, replies)

    # 1. Nothing the server received carries a client's metric: no metric record holds more than
    #    the example count (which SecAgg+ discloses anyway), no number equals a client's metric,
    #    and every array it received is masked integers.
    def values(item):  # type: ignore[no-untyped-def]
        yield from (item if isinstance(item, list) else [item])

    assert len(grid.seen) == 3 * 6  # hello, train.local, and SecAgg+'s four stages
    for message in grid.seen:
        assert not message.has_error()
        assert all(set(record) <= {"num_examples"} for record in message.content.metric_records.values())
        assert all(len(record) == 0 for record in message.content.array_records.values())
        contents = [*message.content.config_records.values(), *message.content.metric_records.values()]
        for record in contents:
            for value in record.values():
                for item in values(value):
                    if isinstance(item, bytes):
                        try:
                            array = bytes_to_ndarray(item)
                        except Exception:
                            continue  # keys and ciphertexts, not arrays
                        assert not np.issubdtype(array.dtype, np.floating)
                    elif isinstance(item, int | float) and not isinstance(item, bool):
                        assert not any(math.isclose(item, x, rel_tol=1e-9) for x in secret), item
    # 2. The round's metrics are their example-weighted means, the replies carry none.
    assert [r.client for r in result.replies] == [0, 1, 2]
    assert all(r.metrics == {} for r in result.replies)
    bound = metric_error_bound(transport.secagg_settings[1])
    assert 0 < bound < 1e-5
    total = sum(counts)
    assert (
        abs(result.metrics["train_loss"] - sum(x * n for x, n in zip(losses, counts, strict=True)) / total)
        <= bound
    )
    assert (
        abs(result.metrics["steps"] - sum(x * n for x, n in zip(steps, counts, strict=True)) / total) <= bound
    )
    assert relative(result.arrays, plain_mean(uploads, counts)) < 1e-6


# ------------------------------------------------------------------------------------------
# federation.weighting under SecAgg+: each client weights its own upload as the server's plain
# mean (`weighted_mean`) would, through the one `upload_weight`.


def test_uniform_weighting_gives_every_client_the_same_secagg_weight() -> None:
    from flwr.app import Context, RecordDict

    from fedcollm.engines.flower.secagg import HELD_META, hold
    from fedcollm.federation.aggregate import upload_weight

    counts = [3, 40, 11]
    uploads = adapters(3)
    weights = [upload_weight(n, "uniform") for n in counts]
    settings = derive_settings(stats_for(uploads, weights), FlowerOptions(secagg=True))
    assert len(set(settings.weights)) == 1 and len(set(settings.exact_weights)) == 1
    got = secure_mean(uploads, weights, settings)
    assert relative(got, plain_mean(uploads, [1, 1, 1])) < 1e-6
    assert relative(got, plain_mean(uploads, counts)) > 1e-2  # not the example-weighted mean
    # What a client holds, and so masks with (FitRes.num_examples), is that same weight.
    context = Context(run_id=1, node_id=100, node_config={}, state=RecordDict(), run_config={})
    hold(context, 1, uploads[1], upload_weight(counts[1], "uniform"))
    assert context.state.config_records[HELD_META]["weight"] == 1


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_a_secagg_round_weighs_uploads_and_metrics_as_the_plain_mean_does(
    weighting: str, server_identity: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SecAgg+ round through the transport and the real ClientApp (training stubbed out) unmasks
    the mean `weighted_mean` computes from the same replies, metrics weighted alike."""
    from fedcollm.config import build_config
    from fedcollm.federation.aggregate import weighted_mean
    from fedcollm.protocol import ClientReply

    counts, losses = [2, 30, 7], [1.0, 2.0, 4.0]
    uploads = adapters(3, seed=5)
    replies = [ClientReply(k, uploads[k], counts[k], {"train_loss": losses[k]}) for k in range(3)]
    config = build_config({"algorithm": "fedavg", "federation": {"num_clients": 3, "weighting": weighting}})
    transport, _, result = secagg_round(monkeypatch, config, replies)

    want = weighted_mean(replies, config.federation.weighting)
    assert relative(result.arrays, want) < 1e-6
    other = weighted_mean(replies, "uniform" if weighting == "examples" else "examples")
    assert relative(result.arrays, other) > 1e-2
    weights = [1, 1, 1] if weighting == "uniform" else counts
    # The server derived its settings (error bound, metric scale) from the weights the clients used.
    settings = transport.secagg_settings[1]
    assert settings.exact_weights == tuple(w / max(weights) for w in weights)
    loss = sum(x * w for x, w in zip(losses, weights, strict=True)) / sum(weights)
    assert abs(result.metrics["train_loss"] - loss) <= metric_error_bound(settings)
    assert result.num_examples == sum(counts)  # the record still counts every example
