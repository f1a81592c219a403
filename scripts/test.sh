#!/usr/bin/env bash
# Runs every test: Rust unit/property tests, then the integration tests that
# drive a real corrald with the real Python SDK and xe.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/corral/target}"
venv="${CORRAL_VENV:-$HOME/.cache/corral/venv}"

# Import direction, circles and file length (docs/architecture.md).
python3 scripts/check-layers.py

cargo build --workspace --bins
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace
else
  cargo test --workspace
fi
# Doctests nextest does not run (Ref<C> type safety is a compile_fail one).
cargo test --quiet --doc -p corral-model

# The fuzz targets (HTTP heads, XML-RPC, JSON-RPC), a bounded run each.
./scripts/fuzz.sh "${FUZZ_SECONDS:-20}"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check XenAPI pytest ansible
# Xen Orchestra's connector, pinned by tests/node/package-lock.json.
(cd tests/node && npm ci --silent --no-audit --no-fund)
export CORRAL_REQUIRE_NODE=1
# The tiny Debian-kernel + busybox guest the VM tests boot (cached).
./scripts/build-test-guest.sh
cd tests/python
"$venv/bin/python" -m pytest -q -rs
