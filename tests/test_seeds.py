"""Seeds in a comparison: each moves the partition and the training, never the evaluation questions."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcollm.cli import app
from fedcollm.config import ConfigError, build_config
from fedcollm.engines import run_experiment
from fedcollm.evaluation.records import read_question_sets
from fedcollm.experiment.compare import run_comparison
from fedcollm.experiment.plan import variant, with_seed
from fedcollm.parties.data import ExperimentData
from tests.helpers import saved_adapter, tiny_config


def test_a_seed_moves_the_partition_but_not_the_evaluation_questions(
    tiny_llama: Path, tiny_llama_big: Path
) -> None:
    base = build_config(tiny_config(tiny_llama, tiny_llama_big, task={"name": "arc_easy", "train_limit": 40}))
    other = with_seed(base, 7)
    assert other.seed == 7 and other.eval_seed == base.seed
    a, b = ExperimentData.load(base), ExperimentData.load(other)
    assert a.split != b.split
    assert [q.id for q in a.eval_records] == [q.id for q in b.eval_records]
    # The seed the base experiment had is the base experiment itself (its runs are reused).
    assert with_seed(base, base.seed) is base
    # Without the pin, the seed would draw other questions: the pin is what keeps them.
    unpinned = build_config({**base.model_dump(mode="json"), "seed": 7})
    assert [q.id for q in ExperimentData.load(unpinned).eval_records] != [q.id for q in a.eval_records]
    # A variant for another task keeps the pinned evaluation seed.
    assert variant(other, "commonsense_qa", "fedavg").eval_seed == base.seed


def test_compare_runs_every_method_once_per_seed_on_the_same_questions(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path
) -> None:
    base = build_config(tiny_config(tiny_llama, tiny_llama_big, federation={"rounds": 1, "num_clients": 2}))
    runs = run_comparison(base, tmp_path, run_experiment, ["fedavg"], ["arc_easy"], seeds=[0, 1])
    assert [(r.method, r.seed) for r in runs] == [("fedavg", 0), ("fedavg", 1)]
    assert runs[0].folder != runs[1].folder
    questions = [[q.id for q in s.questions] for r in runs for s in read_question_sets(r.folder)]
    assert len(questions) == 4 and all(ids == questions[0] for ids in questions)
    a, b = saved_adapter(runs[0].folder), saved_adapter(runs[1].folder)
    assert any((a[k] != b[k]).any() for k in a)  # another seed trained another adapter
    with pytest.raises(ConfigError, match="repeat a seed"):
        run_comparison(base, tmp_path, run_experiment, ["fedavg"], ["arc_easy"], seeds=[1, 1])


def test_the_seeds_option_refuses_what_is_not_a_list_of_integers(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[slm]\nname = "smollm2-135m"\n')
    result = CliRunner().invoke(app, ["compare", str(config), "--seeds", "0,one"])
    assert result.exit_code == 2
    assert "--seeds '0,one': expected comma-separated integers" in result.output
