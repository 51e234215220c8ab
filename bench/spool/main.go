// Command spool measures what the spool costs a Caddy in front of a real
// upstream that takes every delivery: unique valid deliveries at a fixed
// concurrency (32), to one Caddy serving one site per configuration, in
// interleaved rounds. For each configuration it reports deliveries per
// second as the sender sees them (the answer, 200 or 202), Caddy's CPU time
// per delivery, and the spool's commits per delivery (spool_commits_total;
// each bbolt commit is two fdatasync calls). In mode always, a round also
// waits until the upstream has every delivery, and reports that rate too.
// With -redis, it also measures the Redis stores, replay and spool, there.
//
// Run from the repository: go run ./bench/spool -caddy bench/out/caddy
// (build it with go build -o bench/out/caddy ./cmd/caddy).
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testkit"
)

const (
	secret  = "spool-bench-secret"
	account = "bench"
)

// target is one site: the module with its replay and spool settings.
type target struct {
	name, settings string
	port           int
}

var targets = []*target{
	{name: "no spool", settings: "replay off\n\t\tspool off"},
	{name: "fallback", settings: "replay off"},
	{name: "memory replay, no spool", settings: "spool off"},
	{name: "memory replay, fallback", settings: ""},
	{name: "always", settings: "replay off\n\t\tspool {\n\t\t\tmode always\n\t\t}"},
}

func main() {
	caddyBin := flag.String("caddy", "bench/out/caddy", "Caddy with the module")
	n := flag.Int("n", 4000, "deliveries per target and round")
	c := flag.Int("c", 32, "concurrent senders")
	rounds := flag.Int("rounds", 5, "rounds")
	profile := flag.String("profile", "", "write a 10 s CPU profile of Caddy, taken during the first round, to this file")
	only := flag.String("only", "", "measure only the target of this name")
	redisURL := flag.String("redis", "", "also measure the Redis stores on this redis:// URL (configure it as docs/several-instances.md asks: appendonly yes, appendfsync always)")
	flag.Parse()
	if *redisURL != "" {
		benchRedisURL = *redisURL
		targets = append(targets,
			&target{name: "redis replay, no spool", settings: "replay redis {env.BENCH_REDIS_URL} bench:replay:\n\t\tspool off"},
			&target{name: "redis replay, redis fallback", settings: "replay redis {env.BENCH_REDIS_URL} bench:replay:\n\t\tspool {\n\t\t\tstore redis {env.BENCH_REDIS_URL} bench:spool:\n\t\t}"},
			&target{name: "always, redis", settings: "replay off\n\t\tspool {\n\t\t\tstore redis {env.BENCH_REDIS_URL} bench:always:\n\t\t\tmode always\n\t\t}"},
		)
	}
	profileTo = *profile
	if *only != "" {
		targets = slices.DeleteFunc(targets, func(t *target) bool { return t.name != *only })
		if len(targets) == 0 {
			fmt.Fprintln(os.Stderr, "spool: no target named", *only)
			os.Exit(2)
		}
	}
	if err := run(*caddyBin, *n, *c, *rounds); err != nil {
		fmt.Fprintln(os.Stderr, "spool:", err)
		os.Exit(1)
	}
}

func run(caddyBin string, n, conc, rounds int) error {
	var taken atomic.Int64
	up := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		taken.Add(1)
	})}
	upPort, err := testkit.FreePort()
	if err != nil {
		return err
	}
	up.Addr = fmt.Sprintf("127.0.0.1:%d", upPort)
	go func() { _ = up.ListenAndServe() }()
	defer up.Close()

	dir, err := os.MkdirTemp("", "trivialsec-spool-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	admin, err := testkit.FreePort()
	if err != nil {
		return err
	}
	var sites strings.Builder
	for i, t := range targets {
		if t.port, err = testkit.FreePort(); err != nil {
			return err
		}
		fmt.Fprintf(&sites, `http://127.0.0.1:%d {
	trivialsec_webhook {
		account %s
		secret {env.TRIVIALSEC_WEBHOOK_SECRET}
		%s
	}
	reverse_proxy %s
}
`, t.port, account, strings.ReplaceAll(t.settings, "spool {\n\t\t\tmode", fmt.Sprintf("spool {\n\t\t\tstore file %s\n\t\t\tmode", filepath.Join(dir, strconv.Itoa(i)))), up.Addr)
	}
	config := filepath.Join(dir, "Caddyfile")
	cf := fmt.Sprintf("{\n\tadmin 127.0.0.1:%d\n\tpersist_config off\n\tmetrics\n}\n%s", admin, sites.String())
	if err := os.WriteFile(config, []byte(cf), 0o600); err != nil {
		return err
	}
	env := append(os.Environ(), "TRIVIALSEC_WEBHOOK_SECRET="+secret, "XDG_DATA_HOME="+filepath.Join(dir, "data"), "BENCH_REDIS_URL="+benchRedisURL)
	caddy, err := testkit.StartCaddy(caddyBin, config, env, nil, fmt.Sprintf("127.0.0.1:%d", targets[0].port))
	if err != nil {
		return err
	}
	defer caddy.Stop()
	pid := caddy.Cmd.Process.Pid
	metrics := fmt.Sprintf("http://127.0.0.1:%d/metrics", admin)

	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: conc}, Timeout: 60 * time.Second}
	if profileTo != "" {
		go func() {
			resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/profile?seconds=10", admin))
			if err != nil {
				fmt.Fprintln(os.Stderr, "profile:", err)
				return
			}
			defer resp.Body.Close()
			f, err := os.Create(profileTo)
			if err != nil {
				fmt.Fprintln(os.Stderr, "profile:", err)
				return
			}
			defer f.Close()
			_, _ = io.Copy(f, resp.Body)
		}()
	}
	type result struct{ rps, cpuUS, commits, drainRPS float64 }
	results := make(map[string][]result)
	for round := 1; round <= rounds; round++ {
		for _, t := range targets {
			deliveries := mint(n)
			commits0, err := scrape(client, metrics, "caddy_trivialsec_webhook_spool_commits_total")
			if err != nil {
				return err
			}
			taken0 := taken.Load()
			cpu0, err := cpuTicks(pid)
			if err != nil {
				return err
			}
			start := time.Now()
			if err := send(client, fmt.Sprintf("http://127.0.0.1:%d/", t.port), deliveries, conc); err != nil {
				return fmt.Errorf("%s: %v", t.name, err)
			}
			elapsed := time.Since(start)
			// mode always: the upstream has them only once the spool
			// delivered them.
			for taken.Load()-taken0 < int64(n) {
				if time.Since(start) > 5*time.Minute {
					return fmt.Errorf("%s: the upstream got %d of %d", t.name, taken.Load()-taken0, n)
				}
				time.Sleep(5 * time.Millisecond)
			}
			drained := time.Since(start)
			cpu1, err := cpuTicks(pid)
			if err != nil {
				return err
			}
			commits1, err := scrape(client, metrics, "caddy_trivialsec_webhook_spool_commits_total")
			if err != nil {
				return err
			}
			r := result{
				rps:      float64(n) / elapsed.Seconds(),
				cpuUS:    float64(cpu1-cpu0) * 1e6 / ticksPerSecond / float64(n),
				commits:  (commits1 - commits0) / float64(n),
				drainRPS: float64(n) / drained.Seconds(),
			}
			results[t.name] = append(results[t.name], r)
			fmt.Printf("round %d %-30s %8.0f deliveries/s answered, %8.0f /s taken by the upstream, %6.1f µs CPU each, %.3f commits each\n",
				round, t.name, r.rps, r.drainRPS, r.cpuUS, r.commits)
		}
	}

	median := func(name string, f func(result) float64) float64 {
		var v []float64
		for _, r := range results[name] {
			v = append(v, f(r))
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	ratio := func(a, b string, f func(result) float64) float64 {
		var v []float64
		for i := range results[a] {
			v = append(v, f(results[a][i])/f(results[b][i]))
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	rps := func(r result) float64 { return r.rps }
	cpu := func(r result) float64 { return r.cpuUS }
	fmt.Printf("\nmedians over %d rounds of %d deliveries at concurrency %d:\n", rounds, n, conc)
	for _, t := range targets {
		fmt.Printf("  %-30s %8.0f deliveries/s, %6.1f µs CPU, %.3f commits per delivery\n",
			t.name, median(t.name, rps), median(t.name, cpu), median(t.name, func(r result) float64 { return r.commits }))
	}
	if len(targets) < 5 {
		return nil
	}
	if benchRedisURL != "" {
		fmt.Printf("  always, redis, taken by the upstream: %.0f deliveries/s\n", median("always, redis", func(r result) float64 { return r.drainRPS }))
		fmt.Printf("  redis replay, redis fallback / redis replay, no spool: requests/s %.3f, CPU %.3f\n",
			ratio("redis replay, redis fallback", "redis replay, no spool", rps), ratio("redis replay, redis fallback", "redis replay, no spool", cpu))
		fmt.Printf("  always, redis / always (file):                requests/s %.3f, CPU %.3f\n", ratio("always, redis", "always", rps), ratio("always, redis", "always", cpu))
	}
	fmt.Printf("  always, taken by the upstream: %.0f deliveries/s\n", median("always", func(r result) float64 { return r.drainRPS }))
	fmt.Printf("ratios within a round (median):\n")
	fmt.Printf("  fallback / no spool:                          requests/s %.3f, CPU %.3f\n", ratio("fallback", "no spool", rps), ratio("fallback", "no spool", cpu))
	fmt.Printf("  memory replay, fallback / memory replay, no spool: requests/s %.3f, CPU %.3f\n",
		ratio("memory replay, fallback", "memory replay, no spool", rps), ratio("memory replay, fallback", "memory replay, no spool", cpu))
	fmt.Printf("  always / no spool:                            requests/s %.3f, CPU %.3f\n", ratio("always", "no spool", rps), ratio("always", "no spool", cpu))
	return nil
}

// profileTo is where -profile writes.
var profileTo string

// benchRedisURL is -redis.
var benchRedisURL string

// ticksPerSecond is the kernel's USER_HZ, 100 on Linux.
const ticksPerSecond = 100

// cpuTicks is the CPU time a process has used, user and system, in ticks.
func cpuTicks(pid int) (int64, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	fields := strings.Fields(string(raw[strings.LastIndexByte(string(raw), ')')+2:]))
	utime, _ := strconv.ParseInt(fields[11], 10, 64)
	stime, _ := strconv.ParseInt(fields[12], 10, 64)
	return utime + stime, nil
}

type delivery struct{ auth, body string }

func mint(n int) []delivery {
	out := make([]delivery, n)
	now := time.Now()
	for i := range out {
		id := uuid.NewString()
		out[i].auth, out[i].body = testkit.Mint(secret, account, id, id, now)
	}
	return out
}

// send posts every delivery, conc at a time; any answer but 200 or 202 is
// an error.
func send(client *http.Client, url string, deliveries []delivery, conc int) error {
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, conc)
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= len(deliveries) {
					return
				}
				req, _ := http.NewRequest(http.MethodPost, url, strings.NewReader(deliveries[i].body))
				req.Header.Set("Authorization", deliveries[i].auth)
				resp, err := client.Do(req)
				if err != nil {
					errs <- err
					return
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 && resp.StatusCode != 202 {
					errs <- fmt.Errorf("answered %d", resp.StatusCode)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}

// scrape reads one counter from Caddy's metrics.
func scrape(client *http.Client, url, name string) (float64, error) {
	resp, err := client.Get(url)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			return strconv.ParseFloat(v, 64)
		}
	}
	return 0, sc.Err()
}
