#!/usr/bin/env python3
"""Lints helm/kakehashi with the real Helm engine (the helm-sdkpy wheel bundles it) for
each case of the values matrix: the chart's defaults, then every helm/kakehashi/ci/*.yaml
merged over them.

    python3 ops/helm_lint.py [CHART_DIR]

Helm's lint reads only the chart's own values.yaml, so each case is linted on a copy of
the chart whose values.yaml is the merged document. A case fails on any lint error; the
non-default cases also fail when a `required` value is missing (Helm's lint only warns
about those, and the matrix cases are meant to be complete). The library reports an
error's location but not its text, so on failure each template is linted alone to name
the one that breaks.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ERROR_SEVERITY = 3  # helm/pkg/lint/support: 1 info, 2 warning, 3 error


def lint_once(chart: Path) -> tuple[dict, str]:
    """Lints in a child process: the Go library writes warnings to the process's stderr,
    which only a child's can be captured from."""
    code = (
        "import asyncio, json, sys, helm_sdkpy\n"
        "r = asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(sys.argv[1]))\n"
        "print(json.dumps(r))\n"
    )
    p = subprocess.run([sys.executable, "-c", code, str(chart)], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"helm lint of {chart} crashed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


def errors_of(result: dict) -> list[str]:
    return [m.get("Path", "?") for m in result.get("Messages") or [] if m.get("Severity", 0) >= ERROR_SEVERITY]


def merge(base, over):
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base.get(k), v) if k in base else v
        return out
    return over


def culprits(chart: Path) -> list[str]:
    """Templates that fail when linted alone (helpers kept)."""
    found = []
    templates = sorted(p.name for p in (chart / "templates").iterdir() if p.suffix in (".yaml", ".yml"))
    for name in templates:
        with tempfile.TemporaryDirectory() as tmp:
            solo = Path(tmp) / chart.name
            shutil.copytree(chart, solo)
            for other in templates:
                if other != name:
                    (solo / "templates" / other).unlink()
            result, _ = lint_once(solo)
            if errors_of(result):
                found.append(f"templates/{name}")
    return found


def lint_case(chart: Path, name: str, values_file: Path | None) -> bool:
    import yaml  # PyYAML; check-ops.sh installs it when missing

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / chart.name
        shutil.copytree(chart, copy, ignore=shutil.ignore_patterns("ci"))
        if values_file is not None:
            base = yaml.safe_load((chart / "values.yaml").read_text()) or {}
            over = yaml.safe_load(values_file.read_text()) or {}
            (copy / "values.yaml").write_text(yaml.safe_dump(merge(base, over), sort_keys=False))
        result, stderr = lint_once(copy)
        errors = errors_of(result)
        missing = [line for line in stderr.splitlines() if "missing required value" in line]
        if "values.yaml" in errors:
            print(f"helm lint [{name}]: FAILED: the values do not match values.schema.json", file=sys.stderr)
            return False
        if errors:
            where = culprits(copy) or errors
            print(f"helm lint [{name}]: FAILED: errors in {', '.join(sorted(set(where)))}", file=sys.stderr)
            return False
        if values_file is not None and missing:
            print(f"helm lint [{name}]: FAILED: the case leaves required values unset:", file=sys.stderr)
            for line in sorted(set(missing)):
                print(f"  {line}", file=sys.stderr)
            return False
        note = f" ({len(set(missing))} required values unset, as expected of bare defaults)" if missing else ""
        print(f"helm lint [{name}]: ok{note}")
        return True


def main() -> int:
    chart = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "helm" / "kakehashi").resolve()
    cases = [("defaults", None)] + [(p.stem, p) for p in sorted((chart / "ci").glob("*.yaml"))]
    ok = True
    for name, values in cases:
        ok &= lint_case(chart, name, values)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("HELM_CACHE_HOME", tempfile.gettempdir() + "/kakehashi-helm-cache")
    sys.exit(main())
