"""Turns bench/run.sh's results into ratios, medians and BENCHMARKS.md."""
import datetime
import os
import platform
import statistics
import subprocess
import sys

results, cpu_results, report, command, body_size = sys.argv[1:6]


def table(path):
    """A results file: the target names, each round's values, and each target's column."""
    rows = [line.rstrip("\n").split("\t") for line in open(path)]
    names, rounds = rows[0][1:], [[float(v) for v in r[1:]] for r in rows[1:]]
    return names, rounds, {n: [r[i] for r in rounds] for i, n in enumerate(names)}


names, rounds, col = table(results)
_, cpu_rounds, cpu_col = table(cpu_results)

pairs = [
    ("module + respond / respond", "respond+module", "respond", 0.90),
    ("module + reverse_proxy / reverse_proxy", "proxy+module", "proxy", 0.95),
    ("module with the spool (fallback) + reverse_proxy / module + reverse_proxy", "proxy+spool", "proxy+module", 0.97),
    ("module + respond / seed receiver", "respond+module", "seed", 10.0),
    # No target: the module against plain Caddy reading the body (vars), and
    # what plain Caddy itself reaches on the same scales.
    ("module + respond / respond reading the body", "respond+module", "respond+read", None),
    ("respond reading the body / respond", "respond+read", "respond", None),
    ("respond / seed receiver", "respond", "seed", None),
]
# Only the pairs whose targets were measured (TARGETS may name a few).
pairs = [p for p in pairs if p[1] in col and p[2] in col]
ratios = {label: [a / b for a, b in zip(col[num], col[den])] for label, num, den, _ in pairs}
medians = {label: statistics.median(v) for label, v in ratios.items()}
# The same pairs in CPU time per request, inverted so that 1 means free: the
# second target's CPU per request over the first's.
cpu_ratios = {label: [b / a for a, b in zip(cpu_col[num], cpu_col[den])] for label, num, den, _ in pairs}
cpu_medians = {label: statistics.median(v) for label, v in cpu_ratios.items()}


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception:
        return "?"


cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip() or platform.processor()
fastapi_version = sh("/usr/bin/python3 -c 'import fastapi; print(fastapi.__version__)'")
caddy_version = (sh("bench/out/caddy version").split() or ["?"])[0]
lines = []
for label, _, _, target in pairs:
    ok = "no target" if target is None else f"target {target:g}: " + ("meets" if medians[label] >= target else "MISSES")
    lines.append(f"{label}: median {medians[label]:.3f} ({ok}); in CPU per request {cpu_medians[label]:.3f}")
print("\n".join(lines))

md = [
    "# Benchmarks",
    "",
    "Throughput of Caddy with and without `trivialsec_webhook`, of plain Caddy reading the body",
    "in a handler and verifying nothing (`vars body {http.request.body}`, target `respond+read`),",
    "and of the seed's FastAPI receiver, measured by `wrk` on loopback, with the CPU time each",
    "server spent per request. Each round measures every target once, back to back; ratios are",
    "taken within a round, and the medians across rounds. Absolute numbers drift by up to 2x",
    "between runs on this shared machine; ratios within a round drift much less.",
    "",
    f"- Command: `{command}`",
    f"- Date: {datetime.date.today().isoformat()}",
    f"- Machine: {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}",
    f"- {sh('go version')}; Caddy {caddy_version}",
    f"- Seed: Python {platform.python_version()}, FastAPI {fastapi_version}, uvicorn one worker",
    f"- Load: `wrk -t1 -c$CONNS` per target, one valid delivery of {body_size} bytes",
    "  (documented style, which every target accepts), replay protection off, sent again and",
    "  again; any answer other than 2xx fails the run.",
    "- With `PIN=1` the servers run on core 1, and wrk and the proxy's upstream on core 0, so",
    "  that the load generator does not take the server's time.",
    "- `respond+module` and `proxy+module` run the module with `spool off`, as before it had",
    "  a spool; `proxy+spool` runs it with the spool in its default mode (`fallback`), which a",
    "  delivery the upstream takes must not pay for.",
    "",
    "## Results",
    "",
    "| | median of requests/s ratios | target | | median of CPU-time ratios |",
    "|---|---|---|---|---|",
]
for label, _, _, target in pairs:
    if target is None:
        md.append(f"| {label} | {medians[label]:.3f} | | | {cpu_medians[label]:.3f} |")
        continue
    ok = "meets" if medians[label] >= target else "**misses**"
    md.append(f"| {label} | {medians[label]:.3f} | {target:g} | {ok} | {cpu_medians[label]:.3f} |")
def per_round(rounds, col, ratios, medians, fmt):
    """A table of each round's values and ratios, and their medians."""
    out = ["| round | " + " | ".join(names) + " | " + " | ".join(label for label, *_ in pairs) + " |",
           "|---" * (1 + len(names) + len(pairs)) + "|"]
    for i, r in enumerate(rounds):
        out.append(f"| {i + 1} | " + " | ".join(format(v, fmt) for v in r) + " | " +
                   " | ".join(f"{ratios[label][i]:.3f}" for label, *_ in pairs) + " |")
    out.append("| median | " + " | ".join(format(statistics.median(col[n]), fmt) for n in names) + " | " +
               " | ".join(f"{medians[label]:.3f}" for label, *_ in pairs) + " |")
    return out


md += ["", "Requests per second, per round:", ""] + per_round(rounds, col, ratios, medians, ",.0f")
md += ["", "CPU time of the server per request, in µs (utime + stime of the Caddy process, or of",
       "the seed's, over the requests wrk counted; for the proxy targets the front Caddy only), and",
       "the same pairs as ratios of CPU time (the second target's over the first's, so that 1 means",
       "the module costs nothing):", ""] + per_round(cpu_rounds, cpu_col, cpu_ratios, cpu_medians, ".1f")
md += [
    "",
    "```mermaid",
    "xychart-beta",
    '    title "Median requests per second"',
    "    x-axis [" + ", ".join(f'"{n}"' for n in names) + "]",
    '    y-axis "requests/s"',
    "    bar [" + ", ".join(f"{statistics.median(col[n]):.0f}" for n in names) + "]",
    "```",
    "",
]
for extra in (os.environ.get("BENCH_NOTES_FILE"), "bench/profile.md"):
    if extra and os.path.exists(extra):
        md += [open(extra).read().rstrip(), ""]
open(report, "w").write("\n".join(md).replace("$CONNS", os.environ.get("CONNS", "32")))
