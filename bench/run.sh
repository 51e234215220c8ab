#!/usr/bin/env bash
# Throughput of Caddy with and without trivialsec_webhook, and of the seed's
# FastAPI receiver, measured by wrk on loopback in interleaved rounds.
# Prints each round's ratios and their medians, and writes BENCHMARKS.md.
#
#   bench/run.sh                 # 5 rounds of 5 s per target
#   ROUNDS=3 DURATION=3s bench/run.sh
#
# Needs: wrk, and for the seed python3-fastapi python3-uvicorn python3-jwt
# (Debian packages; the script installs what is missing when run as root).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5s}
CONNS=${CONNS:-32}
BODY_SIZE=${BODY_SIZE:-1024}
OUT=bench/out
REPORT=${REPORT:-BENCHMARKS.md}
mkdir -p "$OUT"

need=()
command -v wrk >/dev/null || need+=(wrk)
/usr/bin/python3 -c 'import fastapi, uvicorn, jwt' 2>/dev/null || need+=(python3-fastapi python3-uvicorn python3-jwt)
if ((${#need[@]})); then
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

go build -o "$OUT/caddy" ./cmd/caddy
CADDY=$OUT/caddy

export TRIVIALSEC_WEBHOOK_SECRET=bench-signing-secret
export TRIVIALSEC_ACCOUNT=bench

# One delivery with a body of BODY_SIZE bytes, in the documented style (the
# seed wants "Bearer" and a urn:uuid: sub; the module takes both). With
# replay off, the same delivery can be sent again and again.
sign() { # pad -> delivery.txt
	"$CADDY" trivialsec-webhook sign --account bench --style documented --event report_created \
		--payload "{\"report_id\": \"r-1\", \"pad\": \"$1\"}" >"$OUT/delivery.txt"
}
sign ""
base=$(sed -n 2p "$OUT/delivery.txt" | tr -d '\n' | wc -c)
sign "$(head -c "$((BODY_SIZE - base))" /dev/zero | tr '\0' x)"
sed -n 1p "$OUT/delivery.txt" | cut -d' ' -f2- | tr -d '\n' >"$OUT/auth"
sed -n 2p "$OUT/delivery.txt" | tr -d '\n' >"$OUT/body"
export BENCH_AUTH_FILE=$OUT/auth BENCH_BODY_FILE=$OUT/body

port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
P_RESPOND=$(port) P_READ=$(port) P_RESPOND_MOD=$(port) P_PROXY=$(port) P_PROXY_MOD=$(port) P_PROXY_SPOOL=$(port) P_UP=$(port) P_SEED=$(port)

cat >"$OUT/upstream.Caddyfile" <<CADDY
{
	admin off
	persist_config off
}
http://127.0.0.1:$P_UP {
	respond 200
}
CADDY
# The module without the spool, as before it had one; and with it, in its
# default mode (fallback), which the normal path must not pay for.
module_block='trivialsec_webhook {
		account bench
		secret {env.TRIVIALSEC_WEBHOOK_SECRET}
		replay off
		spool off
	}'
spool_block="trivialsec_webhook {
		account bench
		secret {env.TRIVIALSEC_WEBHOOK_SECRET}
		replay off
		spool {
			store file $OUT/spool
		}
	}"
cat >"$OUT/bench.Caddyfile" <<CADDY
{
	admin off
	persist_config off
}
http://127.0.0.1:$P_RESPOND {
	respond 200
}
# Plain Caddy reading the body in a handler, as any verifier must, and
# verifying nothing: what the module's cost is measured against besides
# respond, which leaves the body for net/http to discard after the answer.
http://127.0.0.1:$P_READ {
	vars body {http.request.body}
	respond 200
}
http://127.0.0.1:$P_RESPOND_MOD {
	$module_block
	respond 200
}
http://127.0.0.1:$P_PROXY {
	reverse_proxy 127.0.0.1:$P_UP
}
http://127.0.0.1:$P_PROXY_MOD {
	$module_block
	reverse_proxy 127.0.0.1:$P_UP
}
http://127.0.0.1:$P_PROXY_SPOOL {
	$spool_block
	reverse_proxy 127.0.0.1:$P_UP
}
CADDY

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
# With PIN=1 (the default on 2 or more cores) the servers run on core 1 and
# wrk on core 0, so that they do not take each other's time; the upstream of
# reverse_proxy shares core 0 with wrk.
PIN=${PIN:-$(( $(nproc) >= 2 ))}
on() { # core command... : run pinned when PIN=1
	local core=$1
	shift
	if ((PIN)); then taskset -c "$core" "$@"; else "$@"; fi
}
# spawn core log command... : start a server in the background, pinned when
# PIN=1; $! is then its own pid (taskset execs it).
spawn() {
	local core=$1 log=$2
	shift 2
	if ((PIN)); then taskset -c "$core" "$@" >"$log" 2>&1 & else "$@" >"$log" 2>&1 & fi
	pids+=($!)
}
spawn 0 "$OUT/upstream.log" "$CADDY" run --config "$OUT/upstream.Caddyfile"
spawn 1 "$OUT/caddy.log" "$CADDY" run --config "$OUT/bench.Caddyfile"
caddy_pid=$!
spawn 1 "$OUT/seed.log" /usr/bin/python3 -m uvicorn --app-dir bench seed_receiver:app --host 127.0.0.1 --port "$P_SEED" \
	--workers 1 --no-access-log --log-level warning
seed_pid=$!

declare -A URL=(
	[respond]=http://127.0.0.1:$P_RESPOND/webhook/trivialsec
	[respond+read]=http://127.0.0.1:$P_READ/webhook/trivialsec
	[respond+module]=http://127.0.0.1:$P_RESPOND_MOD/webhook/trivialsec
	[proxy]=http://127.0.0.1:$P_PROXY/webhook/trivialsec
	[proxy+module]=http://127.0.0.1:$P_PROXY_MOD/webhook/trivialsec
	[proxy+spool]=http://127.0.0.1:$P_PROXY_SPOOL/webhook/trivialsec
	[seed]=http://127.0.0.1:$P_SEED/webhook/trivialsec
)
# TARGETS="proxy proxy+module proxy+spool" bench/run.sh measures only those.
read -r -a TARGETS <<<"${TARGETS:-respond respond+read respond+module proxy proxy+module proxy+spool seed}"

# Every target must accept the delivery before anything is measured.
for name in "${TARGETS[@]}"; do
	for _ in $(seq 100); do
		code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H "Authorization: $(cat "$OUT/auth")" \
			--data-binary @"$OUT/body" -H 'Content-Type:' "${URL[$name]}" || true)
		[[ $code == 200 ]] && break
		sleep 0.1
	done
	[[ $code == 200 ]] || { echo "$name answers $code, not 200" >&2; exit 1; }
done

# CPU time a process has used, in clock ticks.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))

measure() { # name -> requests per second, and the server's CPU per request in µs
	local out pid=$caddy_pid before
	[[ $1 == seed ]] && pid=$seed_pid
	before=$(ticks "$pid")
	out=$(on 0 wrk -t1 -c"$CONNS" -d"$DURATION" -s bench/post.lua "${URL[$1]}")
	if ! grep -q '^non2xx 0$' <<<"$out"; then
		echo "$1: answers other than 2xx:" >&2
		echo "$out" >&2
		exit 1
	fi
	awk -v ticks=$(($(ticks "$pid") - before)) -v us="$TICK_US" \
		'/ requests in / {n = $1} /^Requests\/sec:/ {rps = $2} END {printf "%s %.2f\n", rps, ticks * us / n}' <<<"$out"
}

# results.tsv: requests per second; cpu.tsv: the server's CPU µs per request.
results=$OUT/results.tsv cpu=$OUT/cpu.tsv
printf 'round\t%s\n' "$(IFS=$'\t'; echo "${TARGETS[*]}")" | tee "$cpu" >"$results"
for round in $(seq "$ROUNDS"); do
	row=$round cpu_row=$round
	for name in "${TARGETS[@]}"; do
		m=$(measure "$name") || exit 1
		read -r rps us <<<"$m"
		row+=$'\t'$rps cpu_row+=$'\t'$us
	done
	echo "$row" >>"$results"
	echo "$cpu_row" >>"$cpu"
	echo "round $round: $(tail -1 "$results") | CPU µs/request: $(tail -1 "$cpu" | cut -f2-)"
done

# Memory: what unauthenticated uploads and large valid deliveries cost.
cleanup
trap - EXIT
{
	echo "## Memory"
	echo
	echo 'Resident memory of Caddy with the module (replay off, `max_body` 10 MiB), sampled every'
	echo '2 ms by `go run ./bench/memory`, which starts its own Caddy:'
	echo
	go run ./bench/memory -caddy "$CADDY" | sed -n 's/^\(200\|64\) /- &/p'
	echo
	echo "## The spool"
	echo
	echo 'Unique valid deliveries (4,000 a round, 5 rounds) at concurrency 32 to one Caddy with one'
	echo 'site per configuration, in front of an upstream that takes everything, measured by'
	echo '`go run ./bench/spool`: deliveries per second as the sender sees them, Caddy'"'"'s CPU per'
	echo 'delivery, and commits of the spool'"'"'s store per delivery (each commit writes its pages'
	echo 'and calls fdatasync twice). Replay protection is off but where it says memory.'
	echo
	echo '```'
	go run ./bench/spool -caddy "$CADDY" -n 4000 -rounds 5 | sed -n '/^medians/,$p'
	echo '```'
} >"$OUT/notes.md"
cat "$OUT/notes.md"
export BENCH_NOTES_FILE=$OUT/notes.md

/usr/bin/python3 bench/report.py "$results" "$cpu" "$REPORT" \
	"ROUNDS=$ROUNDS DURATION=$DURATION CONNS=$CONNS BODY_SIZE=$BODY_SIZE PIN=$PIN bench/run.sh" "$BODY_SIZE"
