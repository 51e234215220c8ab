"""Turns bench/run.sh's results into ratios, medians and BENCHMARKS.md."""
import datetime
import os
import platform
import statistics
import subprocess
import sys

results, report, command, body_size = sys.argv[1:5]
rows = [line.rstrip("\n").split("\t") for line in open(results)]
names, rounds = rows[0][1:], [[float(v) for v in r[1:]] for r in rows[1:]]
col = {n: [r[i] for r in rounds] for i, n in enumerate(names)}

pairs = [
    ("module + respond / respond", "respond+module", "respond", 0.90),
    ("module + reverse_proxy / reverse_proxy", "proxy+module", "proxy", 0.95),
    ("module + respond / seed receiver", "respond+module", "seed", 10.0),
]
ratios = {label: [a / b for a, b in zip(col[num], col[den])] for label, num, den, _ in pairs}
medians = {label: statistics.median(v) for label, v in ratios.items()}


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
    ok = "meets" if medians[label] >= target else "MISSES"
    lines.append(f"{label}: median {medians[label]:.3f} (target {target:g}: {ok})")
print("\n".join(lines))

md = [
    "# Benchmarks",
    "",
    "Throughput of Caddy with and without `trivialsec_webhook`, and of the seed's FastAPI",
    "receiver, measured by `wrk` on loopback. Each round measures every target once, back to",
    "back; the ratios are taken within a round, and the medians across rounds. Absolute",
    "numbers drift by up to 2x between runs on this shared machine; the ratios do not.",
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
    "",
    "## Results",
    "",
    "| | median | target | |",
    "|---|---|---|---|",
]
for label, _, _, target in pairs:
    ok = "meets" if medians[label] >= target else "**misses**"
    md.append(f"| {label} | {medians[label]:.3f} | {target:g} | {ok} |")
md += ["", "Requests per second, per round:", "", "| round | " + " | ".join(names) + " | " +
       " | ".join(label for label, *_ in pairs) + " |",
       "|---" * (1 + len(names) + len(pairs)) + "|"]
for i, r in enumerate(rounds):
    md.append(f"| {i + 1} | " + " | ".join(f"{v:,.0f}" for v in r) + " | " +
              " | ".join(f"{ratios[label][i]:.3f}" for label, *_ in pairs) + " |")
md.append("| median | " + " | ".join(f"{statistics.median(col[n]):,.0f}" for n in names) + " | " +
          " | ".join(f"{medians[label]:.3f}" for label, *_ in pairs) + " |")
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
