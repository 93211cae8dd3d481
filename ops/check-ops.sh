#!/usr/bin/env bash
# Checks the operations artefacts; exits non-zero on the first failing check.
#   1. ops/METRICS.md, ops/dashboards/ and the chart's copies (helm/kakehashi/files/) are
#      what `python3 ops/gen.py` produces from the current sources (no drift);
#   2. rules and dashboards name only metrics the code exports; every alert has its
#      runbook and a unit test; the chart sets only KAKEHASHI_* variables the binaries
#      read (`ops/gen.py --check`);
#   3. `promtool check rules` and `promtool test rules`;
#   4. the Helm chart, linted by the real Helm engine for each values case
#      (defaults, helm/kakehashi/ci/*.yaml).
# Needs promtool (Debian's `prometheus` package, installed by ops/install-deps.sh) and
# Python 3.11 with helm-sdkpy and PyYAML, which this script pip-installs when missing.
# No Prometheus server is started.
set -euo pipefail
cd "$(dirname "$0")/.."

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "== ops: generated files are up to date"
python3 ops/gen.py --out "$tmp"
drift=0
for path in ops/METRICS.md ops/dashboards helm/kakehashi/files; do
  if ! diff -ru "$path" "$tmp/$path" >"$tmp/diff.txt"; then
    echo "$path differs from a fresh 'python3 ops/gen.py' (run it and commit the result):" >&2
    head -n 40 "$tmp/diff.txt" >&2
    drift=1
  fi
done
[ "$drift" -eq 0 ]

echo "== ops: metric names, runbooks, alert tests"
python3 ops/gen.py --check

echo "== ops: promtool"
if ! command -v promtool >/dev/null 2>&1; then
  echo "promtool is missing: run ops/install-deps.sh (Debian package 'prometheus')" >&2
  exit 1
fi
promtool check rules ops/rules/*.yml
promtool test rules ops/rules/tests/*.yml
# The dashboards' PromQL, parsed by the same engine.
python3 ops/gen.py --dashboard-rules "$tmp/dashboard-queries.yml"
promtool check rules "$tmp/dashboard-queries.yml"

echo "== ops: helm lint (values matrix)"
if ! python3 -c 'import helm_sdkpy, yaml' >/dev/null 2>&1; then
  # helm-sdkpy declares Python >= 3.12 but works on 3.11, hence --ignore-requires-python.
  python3 -m pip install --quiet --disable-pip-version-check --ignore-requires-python helm-sdkpy pyyaml
fi
python3 ops/helm_lint.py helm/kakehashi

echo "== ops: all checks passed"
