#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the demonstration: WildCat against exact attention, speed and
# error, on the GPU when there is one.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
$PY examples/demo.py
