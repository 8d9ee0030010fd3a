#!/usr/bin/env bash
# The wheels a bare GPU machine without network lacks, into .whl/ (git-ignored), for
# `benchmarks/gpu_check.sh` to install there. Run here, where the package registry is
# reachable; then give `.whl` as a carried path with the device run.
# The machine's image (Python 3.12) has torch (CUDA), numpy, scipy, scikit-learn,
# safetensors, pyyaml, pillow, einops, opt-einsum, linear_operator, tqdm, torchvision,
# shellingham, markdown-it-py and pygments; these are what puma needs beside them, at the
# versions CI tests: curvlinops and its own needs, and typer 0.29 with rich, whose
# commands import pydantic (pydantic-core is the one compiled wheel, cp312 x86-64).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 einconv==0.1.0 \
    unfoldNd==0.2.3 typer==0.29.2 rich==15.0.0 annotated-doc==0.0.7 pydantic==2.14.4 \
    pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing_extensions==4.16.0
ls -l .whl
