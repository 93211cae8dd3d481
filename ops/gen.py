#!/usr/bin/env python3
"""Generates the operations artefacts that are derived from the source, and checks them.

    python3 ops/gen.py                 # rewrite ops/METRICS.md, ops/dashboards/*.json and
                                       # the chart's copies (helm/kakehashi/files/)
    python3 ops/gen.py --out DIR       # write the same tree under DIR instead (drift checks)
    python3 ops/gen.py --check         # fail if a rule or dashboard names a metric the
                                       # code does not export, or an alert lacks its
                                       # runbook or a unit test, or the chart sets a
                                       # KAKEHASHI_* variable no binary reads

The metric inventory is read from the Rust sources, not from a running binary: every
`counter!` / `gauge!` / `histogram!` and `describe_*!` call, with metric names given as
string literals, as `const NAME: &str = "..."` constants, or through a local helper that
takes the name as its parameter (`per_channel("relay_frames_forwarded_total")`). A call
whose name cannot be resolved stops the generator, so the inventory is never silently
short. Standard library only: CI runs this on a bare Python 3.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CRATES = ["proto", "coordinator", "relay", "agent", "loadtest"]
# Metric prefix -> the binary (crate directory) that exports it.
PREFIXES = {"coordinator_": "coordinator", "relay_": "relay", "agent_": "agent", "loadtest_": "loadtest"}
METRIC_RE = r"(?:coordinator|relay|agent|loadtest)_[a-z0-9_]+"
MACROS = ["describe_counter", "describe_gauge", "describe_histogram", "counter", "gauge", "histogram"]
# Metrics Prometheus or the exporter add on their own; rules may use them freely.
BUILTIN = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS", "ALERTS_FOR_STATE"}


class GenError(Exception):
    pass


@dataclass
class Metric:
    name: str
    kind: str = ""
    help: str = ""
    unit: str = ""
    labels: dict = field(default_factory=dict)  # key -> set of literal values, or None if dynamic
    recorded_at: list = field(default_factory=list)
    described_at: list = field(default_factory=list)


# ---------------------------------------------------------------- Rust source scanning


def rust_files():
    for crate in CRATES:
        base = ROOT / crate / "src"
        if not base.is_dir():
            continue
        for dirpath, _dirs, files in os.walk(base):
            for f in sorted(files):
                if f.endswith(".rs"):
                    yield Path(dirpath) / f


def strip_comments(src: str) -> str:
    """Blanks `//` comments (keeping line structure) so commented-out calls do not count.
    Strings are kept intact: a `//` inside a string literal is not a comment."""
    out, i, n = [], 0, len(src)
    while i < n:
        c = src[i]
        if c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            out.append(src[i : j + 1])
            i = j + 1
        elif src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def rust_string(lit: str) -> str:
    """The value of a Rust string literal (with quotes), handling `\\` line continuations."""
    body = lit[1:-1]
    body = re.sub(r"\\\n\s*", "", body)
    return body.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")


def split_args(text: str):
    """Splits a macro's argument text at top-level commas."""
    args, depth, cur, i = [], 0, [], 0
    while i < len(text):
        c = text[i]
        if c == '"':
            j = i + 1
            while j < len(text) and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            cur.append(text[i : j + 1])
            i = j + 1
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            args.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
        i += 1
    if "".join(cur).strip():
        args.append("".join(cur).strip())
    return args


def macro_calls(src: str):
    """Yields (macro, args, offset) for every metrics macro call in `src`."""
    pattern = re.compile(r"(?<![A-Za-z0-9_])(?:metrics::)?(" + "|".join(MACROS) + r")!\s*\(")
    for m in pattern.finditer(src):
        start = m.end()
        depth, i = 1, start
        while i < len(src) and depth:
            c = src[i]
            if c == '"':
                j = i + 1
                while j < len(src) and src[j] != '"':
                    j += 2 if src[j] == "\\" else 1
                i = j + 1
                continue
            depth += c == "("
            depth -= c == ")"
            i += 1
        yield m.group(1), split_args(src[start : i - 1]), m.start()


def scan():
    files = {p: strip_comments(p.read_text()) for p in rust_files()}
    consts = {}
    const_re = re.compile(r'\bconst\s+([A-Z][A-Z0-9_]*)\s*:\s*&(?:\'static\s+)?str\s*=\s*"(' + METRIC_RE + r')"\s*;')
    for path, src in files.items():
        for m in const_re.finditer(src):
            old = consts.get(m.group(1))
            if old and old != m.group(2):
                raise GenError(f"constant {m.group(1)} means both {old} and {m.group(2)}; rename one")
            consts[m.group(1)] = m.group(2)

    metrics: dict[str, Metric] = {}
    for path, src in sorted(files.items()):
        rel = path.relative_to(ROOT).as_posix()
        for macro, args, off in macro_calls(src):
            line = src.count("\n", 0, off) + 1
            where = f"{rel}:{line}"
            if not args:
                raise GenError(f"{where}: {macro}! without arguments")
            names = resolve_name(args[0], consts, src, off, where)
            for name in names:
                m = metrics.setdefault(name, Metric(name))
                kind = macro.removeprefix("describe_")
                if m.kind and m.kind != kind:
                    raise GenError(f"{where}: {name} used as {kind} here but as {m.kind} elsewhere")
                m.kind = kind
                if macro.startswith("describe_"):
                    rest = args[1:]
                    if rest and rest[0].startswith("Unit::"):
                        m.unit = rest[0].removeprefix("Unit::")
                        rest = rest[1:]
                    if not rest or not rest[-1].startswith('"'):
                        raise GenError(f"{where}: help text of {name} is not a string literal")
                    help_text = rust_string(rest[-1]).strip()
                    if m.help and m.help != help_text:
                        raise GenError(f"{where}: {name} described twice with different help text")
                    m.help = help_text
                    m.described_at.append(where)
                else:
                    m.recorded_at.append(where)
                    for arg in args[1:]:
                        kv = re.fullmatch(r'"([a-z_][a-z0-9_]*)"\s*=>\s*(.+)', arg, re.S)
                        if not kv:
                            raise GenError(f"{where}: cannot read label argument {arg!r} of {name}")
                        key, value = kv.group(1), kv.group(2).strip()
                        values = m.labels.setdefault(key, set())
                        if value.startswith('"') and values is not None:
                            values.add(rust_string(value))
                        else:
                            m.labels[key] = None
    return metrics, files


def resolve_name(arg, consts, src, off, where):
    """The metric name(s) the first macro argument stands for."""
    if arg.startswith('"'):
        name = rust_string(arg)
        if not re.fullmatch(METRIC_RE, name):
            raise GenError(f"{where}: metric name {name!r} lacks a binary prefix (relay_, coordinator_, ...)")
        return [name]
    last = arg.split("::")[-1]
    if re.fullmatch(r"[A-Z][A-Z0-9_]*", last):
        if last not in consts:
            raise GenError(f"{where}: no `const {last}: &str = \"<metric>\"` found for {arg}")
        return [consts[last]]
    if re.fullmatch(r"[a-z_][a-z0-9_]*", arg):
        # A parameter: find the closure or function that takes it, then its call sites in
        # the same file with a literal name.
        before = src[:off]
        holder = None
        for m in re.finditer(r"let\s+([a-z_][a-z0-9_]*)\s*=\s*\|\s*" + arg + r"\b|fn\s+([a-z_][a-z0-9_]*)\s*(?:<[^>]*>)?\(\s*" + arg + r"\b", before):
            holder = m.group(1) or m.group(2)
        if holder:
            names = re.findall(r"\b" + holder + r'\(\s*"(' + METRIC_RE + r')"\s*\)', src)
            if names:
                return sorted(set(names))
    raise GenError(f"{where}: cannot resolve the metric name {arg!r}; use a literal or a const")


def histogram_rendering(files):
    """'histogram' if the binary's Prometheus exporter is given buckets, else 'summary'
    (metrics-exporter-prometheus renders histograms as summaries by default)."""
    out = {}
    for crate in PREFIXES.values():
        crate_src = "".join(s for p, s in files.items() if p.relative_to(ROOT).parts[0] == crate)
        out[crate] = "histogram" if re.search(r"\.set_buckets(_for_metric)?\s*\(", crate_src) else "summary"
    return out


def binary_of(name):
    for prefix, crate in PREFIXES.items():
        if name.startswith(prefix):
            return crate
    raise GenError(f"{name}: no binary prefix")


# ---------------------------------------------------------------- METRICS.md


def metrics_md(metrics, rendering):
    lines = [
        "# Metrics reference",
        "",
        "Generated by `python3 ops/gen.py` from the Rust sources (every `counter!`, `gauge!`,",
        "`histogram!` and `describe_*!` call); CI fails when this file differs from a fresh run.",
        "Do not edit by hand.",
        "",
        "Histograms are exported as Prometheus *summaries* (`{quantile=\"…\"}`, `_sum`, `_count`)",
        "unless the binary configures buckets, in which case they are Prometheus histograms",
        "(`_bucket{le=…}`); the rendering column says which one the code does today. Summary",
        "quantiles are per process and cannot be aggregated across replicas.",
        "",
    ]
    for crate in sorted({binary_of(n) for n in metrics}):
        lines += [f"## `{crate}`", "", "| name | type | labels | help | recorded at |", "|---|---|---|---|---|"]
        for name in sorted(n for n in metrics if binary_of(n) == crate):
            m = metrics[name]
            kind = m.kind
            if kind == "histogram":
                kind = f"histogram (rendered as {rendering[crate]})"
            labels = []
            for key in sorted(m.labels):
                values = m.labels[key]
                labels.append(f"`{key}` ({', '.join(sorted(values)) if values else 'set at run time'})")
            help_text = m.help.replace("|", "\\|") if m.help else "**no help text: never described**"
            if not m.recorded_at:
                help_text += " **(described, never recorded)**"
            # Files, not lines: a line number would drift with every unrelated edit.
            where = ", ".join(f"`{w}`" for w in sorted({w.rsplit(":", 1)[0] for w in m.recorded_at})) or "—"
            lines.append(f"| `{name}` | {kind} | {'; '.join(labels) or '—'} | {help_text} | {where} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- dashboards


class Dashboards:
    """Builds Grafana dashboards and remembers every expression for the name check."""

    def __init__(self, metrics, rendering):
        self.metrics = metrics
        self.rendering = rendering
        self.exprs = []

    def need(self, name):
        if name not in self.metrics:
            raise GenError(f"a dashboard uses {name}, which the code does not export")
        return name

    def quantile(self, name, q, by=""):
        """The q-quantile of a latency metric, in the form its exporter renders."""
        self.need(name)
        if self.rendering[binary_of(name)] == "histogram":
            group = f"le{', ' + by if by else ''}"
            return f"histogram_quantile({q}, sum by ({group}) (rate({name}_bucket[$__rate_interval])))"
        # Summaries cannot be merged across processes; the worst replica is the honest view.
        return f'max{" by (" + by + ")" if by else ""} ({name}{{quantile="{q}"}})'

    def rate(self, name, by="", sel=""):
        self.need(name)
        agg = f"sum by ({by})" if by else "sum"
        return f"{agg} (rate({name}{{{sel}}}[$__rate_interval]))"

    def panel(self, title, targets, kind="timeseries", unit="short", desc="", w=12, h=8, stack=False):
        for expr, _legend in targets:
            self.exprs.append(expr)
        p = {
            "type": kind,
            "title": title,
            "description": desc,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"w": w, "h": h},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [
                {
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "expr": expr,
                    "legendFormat": legend,
                    "refId": chr(ord("A") + i),
                }
                for i, (expr, legend) in enumerate(targets)
            ],
        }
        if kind == "timeseries":
            p["fieldConfig"]["defaults"]["custom"] = {"stacking": {"mode": "normal" if stack else "none"}, "fillOpacity": 10}
            p["options"] = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]}, "tooltip": {"mode": "multi"}}
        elif kind == "stat":
            p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value", "graphMode": "area"}
        return p

    def dashboard(self, uid, title, desc, rows, extra_vars=()):
        panels, y, pid = [], 0, 1
        for row_title, row_panels in rows:
            panels.append({"type": "row", "title": row_title, "collapsed": False, "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "id": pid, "panels": []})
            pid += 1
            y += 1
            x, row_h = 0, 0
            for p in row_panels:
                w, h = p["gridPos"]["w"], p["gridPos"]["h"]
                if x + w > 24:
                    x, y = 0, y + row_h
                    row_h = 0
                p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
                p["id"] = pid
                pid += 1
                panels.append(p)
                x += w
                row_h = max(row_h, h)
            y += row_h
        variables = [
            {
                "type": "datasource",
                "name": "datasource",
                "label": "Data source",
                "query": "prometheus",
                "current": {},
                "hide": 0,
            }
        ] + list(extra_vars)
        return {
            "uid": uid,
            "title": title,
            "description": desc,
            "tags": ["kakehashi"],
            "editable": True,
            "graphTooltip": 1,
            "schemaVersion": 39,
            "version": 1,
            "time": {"from": "now-6h", "to": "now"},
            "refresh": "30s",
            "timezone": "",
            "annotations": {"list": []},
            "links": [{"type": "dashboards", "tags": ["kakehashi"], "title": "Kakehashi", "asDropdown": True}],
            "templating": {"list": variables},
            "panels": panels,
        }

    def query_var(self, name, label, query):
        self.exprs.append(query.removeprefix("label_values(").rsplit(",", 1)[0])
        return {
            "type": "query",
            "name": name,
            "label": label,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": query, "refId": name},
            "definition": query,
            "refresh": 2,
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "current": {},
            "hide": 0,
            "sort": 1,
        }

    def build(self):
        P, R, Q = self.panel, self.rate, self.quantile
        create = "coordinator_create_session_seconds"
        out = {}

        out["kakehashi-cluster-overview.json"] = self.dashboard(
            "kakehashi-cluster",
            "Kakehashi / Cluster overview",
            "Is the cluster up, how busy is it, and is the control plane answering?",
            [
                ("Health", [
                    P("Relays up", [('sum(up{component="relay"})', "relays")], kind="stat", w=4, h=4,
                      desc="Relay pods Prometheus scrapes successfully."),
                    P("Coordinators up", [('sum(up{component="coordinator"})', "coordinators")], kind="stat", w=4, h=4,
                      desc="Coordinator pods Prometheus scrapes successfully."),
                    P("Live sessions", [("sum(relay_sessions_active)", "sessions")], kind="stat", w=4, h=4,
                      desc="Sessions with a live actor, summed over relays."),
                    P("Sessions created / s", [(R("coordinator_sessions_created_total"), "created")], kind="stat", unit="ops", w=4, h=4),
                    P("Create p99", [(Q(create, "0.99"), "p99")], kind="stat", unit="s", w=4, h=4,
                      desc="CreateSession latency (placement, code, record, event), worst replica."),
                    P("RPC errors / s", [(R("coordinator_rpc_errors_total"), "errors")], kind="stat", unit="ops", w=4, h=4),
                    P("Coordinators reaching their backends", [(f"sum({self.need('coordinator_backends_up')})", "replicas")], kind="stat", w=8, h=4,
                      desc="Replicas whose last probe of Redis and etcd succeeded; the others answer gRPC health NOT_SERVING."),
                    P("Relays ready", [(f"sum({self.need('relay_ready')})", "ready")], kind="stat", w=8, h=4,
                      desc="Relays whose /readyz answers 200: registered in etcd and not draining."),
                    P("Relays draining", [(f"sum({self.need('relay_draining')})", "draining")], kind="stat", w=8, h=4,
                      desc="Relays draining after SIGTERM; their sessions are moving to other relays."),
                ]),
                ("Sessions", [
                    P("Live sessions per relay", [("sum by (instance) (relay_sessions_active)", "{{instance}}")], stack=True,
                      desc="Placement should keep these close together."),
                    P("Created and ended / s", [
                        (R("coordinator_sessions_created_total"), "created"),
                        (R("coordinator_sessions_ended_total", by="reason"), "ended: {{reason}}"),
                    ], unit="ops"),
                    P("Joins / s by role", [(R("coordinator_joins_total", by="role"), "{{role}}")], unit="ops"),
                    P("Sessions moved to another relay / s", [(R("coordinator_session_migrations_total"), "migrations")], unit="ops",
                      desc="Resumes after a relay died or drained."),
                ]),
                ("Control plane", [
                    P("CreateSession latency", [(Q(create, q), f"p{float(q) * 100:g}") for q in ("0.5", "0.9", "0.99")], unit="s"),
                    P("Placement latency", [(Q("coordinator_placement_seconds", q), f"p{float(q) * 100:g}") for q in ("0.5", "0.99")], unit="s",
                      desc="Choosing a relay for a new or moving session, worst replica."),
                    P("Backend errors / s", [(R("coordinator_backend_errors_total", by="backend"), "{{backend}}")], unit="ops",
                      desc="Failed Redis commands, lost etcd watches and failed leader-election calls."),
                    P("RPC errors / s by kind", [(R("coordinator_rpc_errors_total", by="rpc, kind"), "{{rpc}} {{kind}}")], unit="ops", stack=True),
                    P("Leader", [
                        (f"sum({self.need('coordinator_is_leader')})", "replicas that are leader"),
                        (f"sum(increase({self.need('coordinator_leader_terms_total')}[$__range]))", "leader terms started in range"),
                    ], kind="stat", w=6,
                      desc="Exactly one replica leads (etcd election); it ends sessions whose relay is gone."),
                    P("Relays leaving and sessions orphaned / s", [
                        (R("coordinator_relays_expired_total"), "relays left placement"),
                        (R("coordinator_orphaned_sessions_ended_total"), "sessions ended: relay gone past resume window"),
                    ], unit="ops", w=6),
                    P("Backend trouble / s", [
                        (R("coordinator_reaper_errors_total"), "reaper pass errors"),
                        (R("coordinator_relay_end_failures_total"), "RelayAdmin.EndSession failures"),
                        (R("relay_registration_errors_total"), "relay etcd registration errors"),
                        (R("coordinator_relay_directory_errors_total"), "coordinator etcd watch reconnects"),
                    ], unit="ops"),
                ]),
            ],
        )

        relay_sel = 'instance=~"$instance"'
        out["kakehashi-relay-node.json"] = self.dashboard(
            "kakehashi-relay",
            "Kakehashi / Relay node",
            "One relay (or a few): sessions, forwarding by channel, drops, refusals.",
            [
                ("Sessions", [
                    P("Live sessions", [(f"sum by (instance) (relay_sessions_active{{{relay_sel}}})", "{{instance}}")], w=8),
                    P("Session actors started / failed per s", [
                        (R("relay_sessions_started_total", by="instance", sel=relay_sel), "started {{instance}}"),
                        (R("relay_sessions_failed_total", by="instance", sel=relay_sel), "failed {{instance}}"),
                    ], unit="ops", w=8),
                    P("Attaches refused / s by reason", [(R("relay_attach_refused_total", by="reason", sel=relay_sel), "{{reason}}")], unit="ops", w=8),
                    P("Load: live sessions / capacity", [
                        (f"sum by (instance) (relay_sessions_active{{{relay_sel}}}) / sum by (instance) ({self.need('relay_capacity_sessions')}{{{relay_sel}}})", "{{instance}}"),
                    ], unit="percentunit", w=12, desc="What the relay publishes in etcd as its load; placement avoids full relays."),
                    P("Ready and draining", [
                        (f"sum by (instance) ({self.need('relay_ready')}{{{relay_sel}}})", "ready {{instance}}"),
                        (f"sum by (instance) ({self.need('relay_draining')}{{{relay_sel}}})", "draining {{instance}}"),
                    ], w=12, desc="/readyz is 200 while registered and not draining."),
                ]),
                ("Forwarding", [
                    P("Forwarding latency (read to written)", [(Q("relay_forward_latency_seconds", q, by="instance"), f"p{float(q) * 100:g} {{{{instance}}}}") for q in ("0.5", "0.99")], unit="s", w=24,
                      desc="Time a frame spends inside the relay, from read to handed to the recipient's stream."),
                    P("Bandwidth forwarded by channel", [(f"8 * {R('relay_bytes_forwarded_total', by='channel', sel=relay_sel)}", "{{channel}}")], unit="bps", stack=True),
                    P("Frames forwarded / s by channel", [(R("relay_frames_forwarded_total", by="channel", sel=relay_sel), "{{channel}}")], unit="ops", stack=True),
                    P("Screen frames dropped for slow viewers / s", [(R("relay_screen_frames_dropped_total", by="instance", sel=relay_sel), "{{instance}}")], unit="ops",
                      desc="Latency-first: stale screen deltas dropped and a key frame requested."),
                    P("Frames denied by consent / s", [(R("relay_frames_denied_total", by="reason", sel=relay_sel), "{{reason}}")], unit="ops"),
                ]),
                ("Errors", [
                    P("Protocol errors / s", [(R("relay_protocol_errors_total", by="instance", sel=relay_sel), "{{instance}}")], unit="ops"),
                    P("etcd registration errors / s", [(R("relay_registration_errors_total", by="instance", sel=relay_sel), "{{instance}}")], unit="ops"),
                ]),
            ],
            extra_vars=[self.query_var("instance", "Relay", "label_values(relay_sessions_active, instance)")],
        )

        screen_fwd = R("relay_frames_forwarded_total", sel='channel="screen"')
        screen_drop = R("relay_screen_frames_dropped_total")
        out["kakehashi-session-quality.json"] = self.dashboard(
            "kakehashi-quality",
            "Kakehashi / Session latency and quality",
            "How fast sessions start, how often frames are dropped or sessions fail, and how sessions end.",
            [
                ("Start-up", [
                    P("CreateSession latency by quantile", [(Q(create, q), f"p{float(q) * 100:g}") for q in ("0.5", "0.9", "0.99", "0.999")], unit="s"),
                    P("Code entries that failed / s", [(R("coordinator_code_guess_failures_total"), "unknown or expired code")], unit="ops",
                      desc="Customers mistyping codes, or guessing; see the security dashboard."),
                ]),
                ("Quality", [
                    P("Screen frames dropped (share of screen frames)", [(f"{screen_drop} / clamp_min({screen_drop} + {screen_fwd}, 1e-9)", "dropped")], unit="percentunit",
                      desc="Latency-first dropping for slow viewers. A few percent on bad networks is by design."),
                    P("Screen frames forwarded / s", [(screen_fwd, "screen")], unit="ops"),
                    P("Failed session actors / s", [(R("relay_sessions_failed_total"), "failed")], unit="ops",
                      desc="A panic inside a session actor; it ends that session only."),
                    P("Sessions moved to another relay / s", [(R("coordinator_session_migrations_total"), "migrations")], unit="ops"),
                    P("Relay forwarding latency", [(Q("relay_forward_latency_seconds", q), f"p{float(q) * 100:g}") for q in ("0.5", "0.99", "0.999")], unit="s",
                      desc="Time inside the relay from reading a frame to handing it to the recipient's stream, worst relay."),
                ]),
                ("Consent and resume", [
                    P("Consent decisions / s", [(R("coordinator_consent_events_total", by="decision, permission"), "{{decision}} {{permission}}")], unit="ops", w=8,
                      desc="What customers granted, denied or revoked, as their agents report it."),
                    P("ResumeSession calls / s", [(R("coordinator_resume_calls_total", by="result"), "{{result}}")], unit="ops", w=8,
                      desc="Participants moving after a relay loss or drain."),
                    P("ResumeSession latency", [(Q("coordinator_resume_seconds", q), f"p{float(q) * 100:g}") for q in ("0.5", "0.99")], unit="s", w=8,
                      desc="The coordinator's share of a resume; detection (QUIC idle timeout) comes on top."),
                ]),
                ("Endings", [
                    P("Sessions ended / s by reason", [(R("coordinator_sessions_ended_total", by="reason"), "{{reason}}")], unit="ops", stack=True, w=24),
                ]),
            ],
        )

        out["kakehashi-codes-security.json"] = self.dashboard(
            "kakehashi-security",
            "Kakehashi / Codes and security",
            "Code guessing, the cluster-wide guess budget, and everything refused for a reason.",
            [
                ("Session codes", [
                    P("Codes allocated and redeemed / s", [
                        (R("coordinator_codes_allocated_total"), "allocated"),
                        (R("coordinator_codes_redeemed_total"), "redeemed"),
                    ], unit="ops", w=24, desc="Every session gets a code; a redemption is a customer typing it correctly."),
                    P("Wrong codes / s", [(R("coordinator_code_guess_failures_total"), "wrong codes")], unit="ops", w=8),
                    P("Refused by the guess limiter / s", [(R("coordinator_guess_refusals_total", by="reason"), "{{reason}}")], unit="ops", w=8),
                    P("Guess budget exceeded", [(f"max({self.need('coordinator_guess_budget_exceeded')})", "exceeded")], kind="stat", w=4,
                      desc="1 while the cluster-wide wrong-code budget is exceeded: every source loses its free failures."),
                    P("Wrong codes in the budget window", [(f"max({self.need('coordinator_guess_budget_failures')})", "window")], kind="stat", w=4),
                ]),
                ("Refusals", [
                    P("API errors / s by kind", [(R("coordinator_rpc_errors_total", by="kind"), "{{kind}}")], unit="ops",
                      desc="bad_ticket, bad_token and guess_limited are the security-relevant ones."),
                    P("Relay attaches refused / s by reason", [(R("relay_attach_refused_total", by="reason"), "{{reason}}")], unit="ops",
                      desc="Forged, expired, wrong-relay or wrong-session tokens are refused here."),
                    P("Frames denied by consent / s", [(R("relay_frames_denied_total", by="reason"), "{{reason}}")], unit="ops",
                      desc="A participant sent what the customer has not allowed."),
                    P("Protocol errors / s", [(R("relay_protocol_errors_total"), "protocol errors")], unit="ops"),
                ]),
            ],
        )
        return out


# ---------------------------------------------------------------- name checks


def names_in(expr):
    """Metric names an expression refers to (summary/histogram suffixes removed)."""
    names = set()
    for n in re.findall(r"(?<![A-Za-z0-9_:.\"$])(" + METRIC_RE + r")(?![A-Za-z0-9_])", expr):
        names.add(re.sub(r"_(bucket|sum|count)$", "", n) if re.search(r"_(bucket|sum|count)$", n) else n)
    return names


def rule_exprs():
    """(file, expr) for every rule in ops/rules/*.yml, read without a YAML library: rules
    are written with `expr: |` blocks or one-line `expr:` values."""
    out = []
    for path in sorted((ROOT / "ops" / "rules").glob("*.yml")):
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = re.match(r"^(\s*)(?:- )?expr:\s*(.*)$", lines[i])
            if m:
                indent, value = len(m.group(1)), m.group(2).strip()
                if value in ("|", ">", "|-", ">-"):
                    block = []
                    i += 1
                    while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                        block.append(lines[i].strip())
                        i += 1
                    out.append((path, " ".join(block)))
                    continue
                out.append((path, value.strip("'\"")))
            i += 1
    return out


def check_names(metrics, rendering, dash_exprs):
    problems = []
    records = set()
    for path in sorted((ROOT / "ops" / "rules").glob("*.yml")):
        records |= set(re.findall(r"^\s*-?\s*record:\s*(\S+)", path.read_text(), re.M))
    for where, expr in [("dashboards", e) for e in dash_exprs] + [(p.relative_to(ROOT).as_posix(), e) for p, e in rule_exprs()]:
        for name in names_in(expr):
            if name not in metrics:
                problems.append(f"{where}: {name} is not exported by the code (see ops/METRICS.md)")
            elif metrics[name].kind == "histogram":
                form = rendering[binary_of(name)]
                if form == "summary" and name + "_bucket" in expr:
                    problems.append(f"{where}: {name} is rendered as a summary; {name}_bucket does not exist")
                if form == "histogram" and "quantile=" in expr:
                    problems.append(f"{where}: {name} is rendered as a histogram; it has no quantile label")
    for path, expr in rule_exprs():
        for rec in re.findall(r"\b(kakehashi:[a-z0-9_:]+)", expr):
            if rec not in records:
                problems.append(f"{path.relative_to(ROOT)}: uses recording rule {rec}, which no rule file records")
    return problems


def check_alerts():
    """Every alert links ops/runbooks/<alert>.md, which exists, and is named in a
    `promtool test rules` case; no runbook is left without its alert."""
    problems = []
    alerts = {}
    for path in sorted((ROOT / "ops" / "rules").glob("*.yml")):
        text = path.read_text()
        for m in re.finditer(r"^\s*-\s*alert:\s*(\S+)\s*$", text, re.M):
            name = m.group(1)
            rest = text[m.end():]
            nxt = re.search(r"^\s*-\s*(alert|record):", rest, re.M)
            body = rest[: nxt.start()] if nxt else rest
            link = re.search(r"^\s*runbook_url:\s*(\S+)\s*$", body, re.M)
            alerts[name] = path
            want = f"ops/runbooks/{name}.md"
            if not link or link.group(1).strip("'\"") != want:
                problems.append(f"{path.relative_to(ROOT)}: alert {name} must have `runbook_url: {want}`")
            if not (ROOT / want).is_file():
                problems.append(f"{want} is missing (runbook of alert {name})")
    for rb in sorted((ROOT / "ops" / "runbooks").glob("*.md")):
        if rb.stem not in alerts:
            problems.append(f"ops/runbooks/{rb.name} belongs to no alert")
    tested = set()
    for t in (ROOT / "ops" / "rules" / "tests").glob("*.yml"):
        tested |= set(re.findall(r"alertname:\s*(\S+)", t.read_text()))
    for name in sorted(set(alerts) - tested):
        problems.append(f"alert {name} has no case in ops/rules/tests/")
    return problems


def dashboard_rules(exprs):
    """A rule file with one recording rule per dashboard query, so promtool parses the
    PromQL. Grafana's variables become values Prometheus accepts."""
    subst = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m", "$instance": ".*"}
    lines = ["groups:", "  - name: dashboard-queries", "    rules:"]
    for i, expr in enumerate(exprs):
        for var, value in subst.items():
            expr = expr.replace(var, value)
        if "$" in expr:
            raise GenError(f"dashboard query uses an unknown Grafana variable: {expr}")
        lines += [f"      - record: dashboard:query_{i}", f"        expr: {json.dumps(expr)}"]
    return "\n".join(lines) + "\n"


def check_chart_env(files):
    """Every KAKEHASHI_* variable the chart sets is a flag's `env = "..."` in the code."""
    known = set()
    for src in files.values():
        known |= set(re.findall(r'\benv\s*=\s*"(KAKEHASHI_[A-Z0-9_]+)"', src))
    problems = []
    for tpl in sorted((ROOT / "helm" / "kakehashi" / "templates").glob("*")):
        for var in sorted(set(re.findall(r"\b(KAKEHASHI_[A-Z0-9_]+)", tpl.read_text()))):
            if var not in known:
                problems.append(f"helm/kakehashi/templates/{tpl.name}: sets {var}, which no binary reads (no `env = \"{var}\"`)")
    return problems


# ---------------------------------------------------------------- main


def write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT, help="tree to write into (default: the repository)")
    ap.add_argument("--dashboard-rules", type=Path, metavar="FILE",
                    help="write every dashboard query (Grafana variables replaced) as a rule file, for `promtool check rules`")
    ap.add_argument("--check", action="store_true", help="check metric names, runbooks and alert tests; write nothing")
    args = ap.parse_args()
    try:
        metrics, files = scan()
        rendering = histogram_rendering(files)
        dashboards = Dashboards(metrics, rendering)
        built = dashboards.build()
        if args.dashboard_rules:
            write(args.dashboard_rules, dashboard_rules(dashboards.exprs))
            return 0
        if args.check:
            problems = check_names(metrics, rendering, dashboards.exprs) + check_alerts() + check_chart_env(files)
            undescribed = sorted(n for n, m in metrics.items() if not m.help)
            for n in undescribed:
                print(f"warning: {n} has no help text (no describe_*! call)", file=sys.stderr)
            shown = set().union(*(names_in(e) for e in dashboards.exprs))
            for n in sorted(set(metrics) - shown):
                print(f"note: {n} is on no dashboard (add it to ops/gen.py)", file=sys.stderr)
            for p in problems:
                print(f"error: {p}", file=sys.stderr)
            return 1 if problems else 0
        out = args.out
        write(out / "ops" / "METRICS.md", metrics_md(metrics, rendering))
        dash_dir = out / "ops" / "dashboards"
        chart_files = out / "helm" / "kakehashi" / "files"
        for d in (dash_dir, chart_files / "dashboards", chart_files / "rules"):
            if d.exists():
                shutil.rmtree(d)
        for name, body in built.items():
            text = json.dumps(body, indent=2, sort_keys=True) + "\n"
            write(dash_dir / name, text)
            write(chart_files / "dashboards" / name, text)
        # The chart can only read files inside itself, so it carries copies of the rules.
        for rule in sorted((ROOT / "ops" / "rules").glob("*.yml")):
            write(chart_files / "rules" / rule.name, rule.read_text())
    except GenError as e:
        print(f"ops/gen.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
