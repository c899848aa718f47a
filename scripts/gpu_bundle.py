"""Download what the GPU check needs beyond a bare CUDA PyTorch machine, into one small folder.

The GPU machines this project is checked on (docs/gpu.md) have Python 3.12 with a CUDA PyTorch,
transformers, peft, accelerate, tokenizers, safetensors, numpy, pandas, pyarrow, scipy, rich,
typer and pytest, no network, and take at most 64 MiB along with the working tree. This fetches
the wheels of everything else fedcollm's GPU tests and benchmark import, for CPython 3.12 on
manylinux x86-64, and slims bitsandbytes' wheel (43 MB, mostly one CUDA library per CUDA
release) to the libraries of the CUDA releases named by --cuda. `make gpu-bundle` runs it.

    .venv/bin/python scripts/gpu_bundle.py .gpu-bundle --cuda 130,132
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

WHEELS = [
    "bitsandbytes==0.50.2",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "tomli-w==1.2.0",
    "rapidfuzz==3.14.6",
    "datasets==4.8.5",
    "flwr-datasets==0.6.1",
    "dill==0.4.1",
    "multiprocess==0.70.19",
    "xxhash==4.1.0",
    "matplotlib==3.11.2",  # flwr-datasets imports it (its plotting helpers) with any partitioner
    "contourpy==1.4.0",
    "cycler==0.12.1",
    "fonttools==4.68.0",
    "kiwisolver==1.5.1",
    "pyparsing==3.3.3",
    "pillow==13.0.0",
]
"""Pinned to what the project's own environment resolves (pyproject.toml); no dependencies are
followed, so the list is complete by itself."""

PLATFORMS = [
    "manylinux2014_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_28_x86_64",
]
LIMIT = 60 * 2**20
"""What the bundle may weigh: the 64 MiB a check carries, less the working tree."""


def download(folder: Path) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        *platforms,
        "-d",
        str(folder),
        *WHEELS,
    ]
    subprocess.run(command, check=True)


def slim_bitsandbytes(wheel: Path, cuda: set[str]) -> Path:
    """The wheel without the CUDA and ROCm libraries of other releases (RECORD rewritten)."""
    library = re.compile(r"bitsandbytes/libbitsandbytes_(cuda|rocm)(\d+)\.so$")
    slim = wheel.with_name(wheel.name)
    kept: dict[str, bytes] = {}
    with zipfile.ZipFile(wheel) as source:
        for info in source.infolist():
            match = library.search(info.filename)
            if match and not (match.group(1) == "cuda" and match.group(2) in cuda):
                continue
            kept[info.filename] = source.read(info)
    record = next(name for name in kept if name.endswith(".dist-info/RECORD"))
    lines = []
    for name, data in kept.items():
        if name == record:
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={digest},{len(data)}")
    kept[record] = ("\n".join([*lines, f"{record},,"]) + "\n").encode()
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as target:
        for name, data in kept.items():
            target.writestr(name, data)
    tmp.replace(slim)
    return slim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--cuda", default="130,132", help="CUDA releases whose bitsandbytes library to keep")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    download(args.folder)
    (wheel,) = args.folder.glob("bitsandbytes-*.whl")
    slim_bitsandbytes(wheel, set(args.cuda.split(",")))
    total = sum(p.stat().st_size for p in args.folder.glob("*.whl"))
    print(f"{len(list(args.folder.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {args.folder}")
    if total > LIMIT:
        raise SystemExit(
            f"the bundle weighs {total / 2**20:.1f} MiB, over the {LIMIT / 2**20:.0f} MiB a check carries"
        )


if __name__ == "__main__":
    main()
