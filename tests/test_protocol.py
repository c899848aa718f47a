"""The torch-free protocol: messages, metrics and the seeds every party derives alike."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest

from fedcollm.protocol import Metric, Seed, derive_seed


def test_every_purpose_round_and_client_has_its_own_seed() -> None:
    """No two (purpose, round, client) streams share a seed — with a thousand clients too, where
    the old `100 + client` slots ran into the next purpose's."""
    slots = [None, *range(1000)]
    seeds = {
        (purpose, rnd, client): derive_seed(0, purpose, rnd, client)
        for purpose, rnd, client in itertools.product(Seed, range(4), slots)
    }
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds.values())


def test_seeds_are_the_same_in_every_process_and_differ_between_experiment_seeds() -> None:
    here = [derive_seed(7, Seed.CLIENT_TRAIN, 3, 2), derive_seed(7, Seed.SLM_INIT)]
    code = (
        "from fedcollm.protocol import Seed, derive_seed; "
        "print(derive_seed(7, Seed.CLIENT_TRAIN, 3, 2), derive_seed(7, Seed.SLM_INIT))"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert [int(x) for x in there.stdout.split()] == here
    assert derive_seed(8, Seed.CLIENT_TRAIN, 3, 2) != here[0]


def test_a_client_seed_is_not_the_servers_seed_of_the_same_purpose() -> None:
    assert derive_seed(0, Seed.CLIENT_TRAIN, 1) != derive_seed(0, Seed.CLIENT_TRAIN, 1, 0)


def test_the_seed_purposes_are_distinct_numbers() -> None:
    values = [int(purpose) for purpose in Seed]
    assert len(values) == len(set(values))


@pytest.mark.parametrize("note", [None, "why"])
def test_a_metric_line_is_json_able_and_keeps_its_note_only_when_given(note: str | None) -> None:
    import json

    line = Metric(2, "client", 1, "rejected", 1.0, note=note).as_dict()
    assert json.loads(json.dumps(line)) == line
    assert ("note" in line) == (note is not None)
    assert np.isfinite(line["value"])
