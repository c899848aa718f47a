"""Loading a converted GGUF model later: under 2 s, and what the tokenizer fast path saves.

A `.gguf` model is dequantised once into a transformers folder in the cache; every later run
loads that folder. Each figure is a fresh Python process (nothing cached in memory, as in a new
run) after one untimed load that warms the OS page cache, median of `repeats`:

- `load_with_lora(alias)`: model, tokenizer and a fresh LoRA adapter, as every run does (target:
  under 2 s);
- the tokenizer alone, ours (`fedcollm.lm.loading.load_tokenizer`: the plain fast tokenizer over
  the converted tokenizer.json) against `AutoTokenizer.from_pretrained` on the same folder
  (transformers 5 picks GemmaTokenizer, which rebuilds the BPE in Python).

    .venv/bin/python bench/bench_load.py [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchlib import Row, median, run_as_script

_PROBE = """
import json, sys, time
import transformers
transformers.utils.logging.disable_progress_bar()
from fedcollm.lm.loading import load_tokenizer, resolve_model
from fedcollm.lm.models import load_with_lora
from fedcollm.config import LoraConfig
alias, what = sys.argv[1], sys.argv[2]
source = resolve_model(alias)  # converts on the very first call; not timed
start = time.perf_counter()
if what == "model":
    load_with_lora(alias, LoraConfig(), seed=0)
elif what == "tokenizer":
    load_tokenizer(alias)
else:
    transformers.AutoTokenizer.from_pretrained(source)
print(json.dumps(time.perf_counter() - start))
"""


def seconds(alias: str, what: str) -> float:
    """Wall seconds of one load of `what` ("model", "tokenizer", "auto") in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, alias, what], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"loading {alias} ({what}) failed:\n{done.stderr[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1]))


def run(out: Path, quick: bool = False) -> list[Row]:
    """Per packaged model: later-load seconds (target < 2 s) and AutoTokenizer / ours."""
    repeats = 1 if quick else 3
    rows, report = [], {}
    for alias in ("smollm2-135m", "gemma3-270m"):
        seconds(alias, "model")  # converts if needed, warms the page cache
        figures = {
            what: median([seconds(alias, what) for _ in range(repeats)])
            for what in ("model", "tokenizer", "auto")
        }
        report[alias] = figures
        rows.append(
            Row(
                f"later load of converted {alias} (model + tokenizer + LoRA)",
                figures["model"],
                2.0,
                better="lower",
                unit="s",
                detail=f"fresh process, warm page cache, median of {repeats}",
            )
        )
        rows.append(
            Row(
                f"tokenizer load, AutoTokenizer / ours, {alias}",
                figures["auto"] / figures["tokenizer"],
                None,
                detail=f"AutoTokenizer {figures['auto']:.2f} s, ours {figures['tokenizer']:.2f} s "
                "(same encodings: tests/test_models.py)",
            )
        )
    (out / "load.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return rows


if __name__ == "__main__":
    run_as_script(run, __doc__)
