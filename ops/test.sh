#!/usr/bin/env bash
# The full test suite: installs what a fresh machine lacks, then runs every test of the
# workspace. Tests that need Redis or etcd use KAKEHASHI_TEST_REDIS_URL /
# KAKEHASHI_TEST_ETCD_ENDPOINTS when set, and otherwise start their own on free loopback
# ports; under CI=true a missing service fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ops/install-deps.sh
cargo test --workspace --locked "$@"
