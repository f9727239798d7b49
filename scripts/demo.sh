#!/usr/bin/env bash
# The main job: installs what is missing (QEMU, the guest image), builds
# kelpie, and runs a real teleport demo on the embedded defaults.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
KELPIE_SKIP_S3=1 bash scripts/setup.sh
mkdir -p bin
go build -o bin/kelpie ./cmd/kelpie
exec bin/kelpie demo "$@"
