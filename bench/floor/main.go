// Command floor measures what trivialsec_webhook costs over plain Caddy, in
// one Caddy process with one site per target, in interleaved rounds: unique
// valid deliveries (every one a new event ID) of -body bytes at concurrency
// -c, from a sender that writes pre-encoded HTTP/1.1 requests on keep-alive
// connections (no net/http client, so that it stays cheap beside Caddy).
// For each target it reports deliveries per second, Caddy's CPU time per
// delivery, and the latency of each delivery (p50, p99, p99.9); then the
// medians, the ratios of the module's targets to plain Caddy's computed
// within each round, and the CPU the replay store, the spool and its journal
// add to the module with replay off and spool off.
//
// The targets:
//
//	read+respond                   plain Caddy reading the body (vars body {http.request.body}), then respond 200
//	module off/off + respond       the module with replay off and spool off, then respond 200
//	module memory/off + respond    the module with spool off (replay memory)
//	module off/fallback + respond  the module with replay off (spool fallback, file store)
//	module defaults + respond      the module with account and secret only
//	proxy                          plain reverse_proxy to an upstream in this process
//	module off/off + proxy         the module with replay off and spool off, then reverse_proxy
//	module defaults + proxy        the module with account and secret only, then reverse_proxy
//
// Each module target has its own account, so that each has its own memory
// replay store (the store is per account and holds at most 1,000,000 event
// IDs); the targets with the spool on share its default file store, under
// XDG_DATA_HOME, which is a temporary directory.
//
// With -pin (the default on two CPUs or more), Caddy runs on CPU 1 and this
// process (sender and upstream) on CPU 0, as bench/run.sh pins Caddy and wrk.
//
// Run from the repository: go run ./bench/floor -caddy bench/out/caddy
// (build it with go build -o bench/out/caddy ./cmd/caddy).
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testkit"
)

const secret = "floor-bench-secret"

// next is what follows the module, or plain Caddy's handling.
const (
	respond = "respond 200"
	read    = "vars body {http.request.body}\n\trespond 200"
	proxy   = "reverse_proxy {upstream}"
)

// target is one site.
type target struct {
	name string
	// module: the site starts with trivialsec_webhook, with these settings
	// after account and secret.
	module   bool
	settings string
	next     string
	account  string
	port     int
}

func (t *target) memoryReplay() bool { return t.module && !strings.Contains(t.settings, "replay off") }

var allTargets = []*target{
	{name: "read+respond", next: read},
	{name: "module off/off + respond", module: true, settings: "replay off\n\t\tspool off", next: respond},
	{name: "module memory/off + respond", module: true, settings: "spool off", next: respond},
	{name: "module off/fallback + respond", module: true, settings: "replay off", next: respond},
	{name: "module defaults + respond", module: true, next: respond},
	{name: "proxy", next: proxy},
	{name: "module off/off + proxy", module: true, settings: "replay off\n\t\tspool off", next: proxy},
	{name: "module defaults + proxy", module: true, next: proxy},
}

// options are the flags.
type options struct {
	caddy                   string
	n, warmup, conc, rounds int
	body                    int
	only                    string
	pin, metrics            bool
	profile, profileTarget  string
}

func main() {
	var o options
	flag.StringVar(&o.caddy, "caddy", "bench/out/caddy", "Caddy with the module")
	flag.IntVar(&o.n, "n", 60000, "deliveries measured per target and round")
	flag.IntVar(&o.warmup, "warmup", 2000, "deliveries sent, not measured, before each target's measurement")
	flag.IntVar(&o.conc, "c", 32, "connections, each with one delivery in flight")
	flag.IntVar(&o.rounds, "rounds", 5, "rounds; each measures every target in turn")
	flag.IntVar(&o.body, "body", 1024, "body size in bytes (a padding member in the payload)")
	flag.StringVar(&o.only, "only", "", "measure only these targets (comma-separated names)")
	flag.BoolVar(&o.pin, "pin", runtime.NumCPU() >= 2, "run Caddy on CPU 1 and this process (sender, upstream) on CPU 0")
	flag.BoolVar(&o.metrics, "metrics", true, "turn on Caddy's metrics (the global metrics option), in every target alike")
	flag.StringVar(&o.profile, "profile", "", "after the rounds, write a 10 s CPU profile of Caddy serving -profile-target alone to this file")
	flag.StringVar(&o.profileTarget, "profile-target", "module defaults + respond", "the target -profile profiles")
	flag.Parse()

	b := &bench{options: o}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-stop
		b.stopping.Store(true)
		fmt.Fprintln(os.Stderr, "floor: stopped by", s)
		b.cleanup()
		os.Exit(130)
	}()
	err := b.run()
	if err != nil && !b.stopping.Load() {
		fmt.Fprintln(os.Stderr, "floor:", err)
		b.printLog()
	}
	b.cleanup() // waits for the signal's, if that began first
	switch {
	case b.stopping.Load():
		os.Exit(130)
	case err != nil:
		os.Exit(1)
	}
}

// bench is one run.
type bench struct {
	options
	targets  []*target
	profiled *target // a copy of the profiled target, with its own site and account

	stopping atomic.Bool // by SIGINT or SIGTERM
	once     sync.Once   // of cleanup
	mu       sync.Mutex
	cleanups []func() // in the reverse order
	cleaned  bool     // cleanup has begun: atExit runs what it gets at once
	logPath  string
}

// atExit registers f to run at the end, or on SIGINT or SIGTERM.
func (b *bench) atExit(f func()) {
	b.mu.Lock()
	if b.cleaned {
		b.mu.Unlock()
		f()
		return
	}
	defer b.mu.Unlock()
	b.cleanups = append(b.cleanups, f)
}

// cleanup runs what atExit registered, once; a second call waits for the
// first to finish.
func (b *bench) cleanup() {
	b.once.Do(func() {
		b.mu.Lock()
		fns := b.cleanups
		b.cleanups, b.cleaned = nil, true
		b.mu.Unlock()
		for _, f := range slices.Backward(fns) {
			f()
		}
	})
}

// printLog prints the end of Caddy's log, after a failure.
func (b *bench) printLog() {
	b.mu.Lock()
	path := b.logPath
	b.mu.Unlock()
	raw, err := os.ReadFile(path)
	if path == "" || err != nil {
		return
	}
	lines := strings.Split(strings.TrimRight(string(raw), "\n"), "\n")
	fmt.Fprintf(os.Stderr, "the last %d lines of Caddy's log (%s):\n", min(len(lines), 40), path)
	for _, l := range lines[max(0, len(lines)-40):] {
		fmt.Fprintln(os.Stderr, l)
	}
}

// maxReplayEntries is how many deliveries a target with the memory replay
// store may take in a run: its store holds 1,000,000 event IDs, and refuses
// new ones with 503 once full.
const maxReplayEntries = 900_000

func (b *bench) check() error {
	switch {
	case b.n < 1 || b.warmup < 0 || b.conc < 1 || b.rounds < 1 || b.body < 0:
		return errors.New("-n, -c and -rounds must be positive, -warmup and -body not negative")
	case b.n < b.conc:
		return errors.New("-n must be at least -c")
	case b.pin && runtime.NumCPU() < 2:
		return fmt.Errorf("-pin needs two CPUs; this machine has %d", runtime.NumCPU())
	}
	b.targets = allTargets
	if b.only != "" {
		names := strings.Split(b.only, ",")
		for i := range names {
			names[i] = strings.TrimSpace(names[i])
			if !slices.ContainsFunc(allTargets, func(t *target) bool { return t.name == names[i] }) {
				return fmt.Errorf("-only: no target named %q", names[i])
			}
		}
		b.targets = slices.DeleteFunc(slices.Clone(allTargets), func(t *target) bool { return !slices.Contains(names, t.name) })
	}
	for i, t := range b.targets {
		t.account = fmt.Sprintf("floor-%d", i+1)
		if t.memoryReplay() && b.rounds*(b.n+b.warmup) > maxReplayEntries {
			return fmt.Errorf("%s would take %d deliveries in %d rounds: its memory replay store holds 1,000,000 event IDs and refuses more with 503; keep -rounds × (-n + -warmup) within %d",
				t.name, b.rounds*(b.n+b.warmup), b.rounds, maxReplayEntries)
		}
	}
	if b.profile != "" {
		i := slices.IndexFunc(allTargets, func(t *target) bool { return t.name == b.profileTarget })
		if i < 0 {
			return fmt.Errorf("-profile-target: no target named %q", b.profileTarget)
		}
		p := *allTargets[i]
		p.name, p.account = "profile: "+p.name, "floor-profile"
		b.profiled = &p
	}
	return nil
}

// result is one target's measurement in one round.
type result struct {
	rps, cpuUS, benchUS float64
	caddyBusy           float64 // Caddy's CPU time over the wall time
	benchBusy           float64 // this process's
	p50, p99, p999      time.Duration
}

func (b *bench) run() error {
	if err := b.check(); err != nil {
		return err
	}
	nproc := runtime.NumCPU()
	version, err := exec.Command(b.caddy, "version").Output()
	if err != nil {
		return fmt.Errorf("%s version: %w", b.caddy, err)
	}

	dir, err := os.MkdirTemp("", "trivialsec-floor-bench-")
	if err != nil {
		return err
	}
	b.atExit(func() { os.RemoveAll(dir) })

	// The upstream of the proxy targets: reads the body, answers 200.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	up := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.Copy(io.Discard, r.Body)
			w.WriteHeader(http.StatusOK)
		}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	go func() { _ = up.Serve(ln) }()
	b.atExit(func() { up.Close() })

	admin, err := testkit.FreePort()
	if err != nil {
		return err
	}
	sites := b.targets
	if b.profiled != nil {
		sites = append(slices.Clone(sites), b.profiled)
	}
	var cf strings.Builder
	fmt.Fprintf(&cf, "{\n\tadmin 127.0.0.1:%d\n\tpersist_config off\n", admin)
	if b.metrics {
		cf.WriteString("\tmetrics\n")
	}
	cf.WriteString("}\n")
	for _, t := range sites {
		if t.port, err = testkit.FreePort(); err != nil {
			return err
		}
		fmt.Fprintf(&cf, "# %s\nhttp://127.0.0.1:%d {\n", t.name, t.port)
		if t.module {
			fmt.Fprintf(&cf, "\ttrivialsec_webhook {\n\t\taccount %s\n\t\tsecret {env.TRIVIALSEC_WEBHOOK_SECRET}\n", t.account)
			if t.settings != "" {
				fmt.Fprintf(&cf, "\t\t%s\n", t.settings)
			}
			cf.WriteString("\t}\n")
		}
		fmt.Fprintf(&cf, "\t%s\n}\n", strings.ReplaceAll(t.next, "{upstream}", ln.Addr().String()))
	}
	config := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(config, []byte(cf.String()), 0o600); err != nil {
		return err
	}
	logPath := filepath.Join(dir, "caddy.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return err
	}
	b.mu.Lock()
	b.logPath = logPath
	b.mu.Unlock()
	b.atExit(func() { logFile.Close() })
	env := append(os.Environ(),
		"TRIVIALSEC_WEBHOOK_SECRET="+secret,
		"XDG_DATA_HOME="+filepath.Join(dir, "data"),
		"XDG_CONFIG_HOME="+filepath.Join(dir, "config"))

	// Pinned, Caddy starts from a thread on CPU 1, and inherits it (its
	// GOMAXPROCS is then 1, as under taskset -c 1); this process then moves
	// to CPU 0.
	if b.pin {
		if err := pinThreads(1); err != nil {
			return err
		}
	}
	caddy, err := testkit.StartCaddy(b.caddy, config, env, logFile, fmt.Sprintf("127.0.0.1:%d", sites[0].port))
	if err != nil {
		return err
	}
	b.atExit(caddy.Stop)
	pid := caddy.Cmd.Process.Pid
	pinning := "not pinned"
	if b.pin {
		if err := pinThreads(0); err != nil {
			return err
		}
		runtime.GOMAXPROCS(1)
		caddyCPUs, err1 := cpusAllowed(fmt.Sprint(pid))
		selfCPUs, err2 := cpusAllowed("self")
		if err := errors.Join(err1, err2); err != nil {
			return err
		}
		if !slices.Equal(caddyCPUs, []string{"1"}) || !slices.Equal(selfCPUs, []string{"0"}) {
			return fmt.Errorf("pinning failed: Caddy's threads may run on CPUs %v, this process's on %v", caddyCPUs, selfCPUs)
		}
		pinning = "pinned: Caddy on CPU 1, sender and upstream on CPU 0 (each GOMAXPROCS 1)"
	}
	clock := newCPUClock(pid)

	fmt.Printf("bench/floor: Caddy %s (%s), nproc %d, %s\n", strings.TrimSpace(string(version)), b.caddy, nproc, pinning)
	fmt.Printf("Caddy's CPU: %s; Caddy's metrics %s\n", clock.source(), map[bool]string{true: "on", false: "off"}[b.metrics])
	fmt.Printf("%d unique deliveries (+%d warm-up) per target and round, %d rounds interleaved, %d connections, bodies of %d bytes\n\n",
		b.n, b.warmup, b.rounds, b.conc, b.body)

	var reqs batch
	lat := make([]time.Duration, b.n)
	warmLat := make([]time.Duration, b.warmup)
	results := make(map[string][]result)
	for round := 1; round <= b.rounds; round++ {
		for _, t := range b.targets {
			host := fmt.Sprintf("127.0.0.1:%d", t.port)
			if err := reqs.mint(t.account, host, b.warmup+b.n, b.body); err != nil {
				return err
			}
			r, err := measure(host, b.conc, reqs, b.warmup, clock, lat, warmLat)
			if err != nil {
				return fmt.Errorf("round %d, %s: %w", round, t.name, err)
			}
			results[t.name] = append(results[t.name], r)
			fmt.Printf("round %d  %-30s %7.0f deliveries/s  Caddy %6.2f µs CPU each (core %3.0f%% busy)  bench %5.2f µs (%3.0f%%)  p50 %s  p99 %s  p99.9 %s\n",
				round, t.name, r.rps, r.cpuUS, 100*r.caddyBusy, r.benchUS, 100*r.benchBusy, ms(r.p50), ms(r.p99), ms(r.p999))
		}
	}
	if b.profiled != nil {
		if err := b.takeProfile(admin, &reqs); err != nil {
			return err
		}
	}
	b.report(results)
	return nil
}

// measure sends warm deliveries of reqs, then measures the rest.
func measure(host string, conc int, reqs batch, warm int, clock *cpuClock, lat, warmLat []time.Duration) (result, error) {
	s, err := newSender(host, conc)
	if err != nil {
		return result{}, err
	}
	defer s.close()
	if warm > 0 {
		if err := s.send(reqs.slice(0, warm), warmLat); err != nil {
			return result{}, fmt.Errorf("warm-up: %w", err)
		}
	}
	n := reqs.len() - warm
	cpu0, err := clock.read()
	if err != nil {
		return result{}, err
	}
	self0, start := selfCPU(), time.Now()
	if err := s.send(reqs.slice(warm, warm+n), lat[:n]); err != nil {
		return result{}, err
	}
	wall, self1 := time.Since(start), selfCPU()
	cpu1, err := clock.read()
	if err != nil {
		return result{}, err
	}
	l := lat[:n]
	slices.Sort(l)
	pct := func(q float64) time.Duration { return l[min(n-1, int(q*float64(n)))] }
	return result{
		rps:       float64(n) / wall.Seconds(),
		cpuUS:     float64((cpu1 - cpu0).Microseconds()) / float64(n),
		benchUS:   float64((self1 - self0).Microseconds()) / float64(n),
		caddyBusy: float64(cpu1-cpu0) / float64(wall),
		benchBusy: float64(self1-self0) / float64(wall),
		p50:       pct(0.50), p99: pct(0.99), p999: pct(0.999),
	}, nil
}

// profileSeconds is the length of the CPU profile.
const profileSeconds = 10

// takeProfile profiles Caddy for profileSeconds while it serves only the
// profiled target's twin site: batches of -n new deliveries, until the
// profile is in (at most a minute).
func (b *bench) takeProfile(admin int, reqs *batch) error {
	t := b.profiled
	host := fmt.Sprintf("127.0.0.1:%d", t.port)
	done := make(chan error, 1)
	go func() {
		client := &http.Client{Timeout: (profileSeconds + 30) * time.Second}
		resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/profile?seconds=%d", admin, profileSeconds))
		if err != nil {
			done <- err
			return
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
			done <- fmt.Errorf("profile: %s: %s", resp.Status, msg)
			return
		}
		f, err := os.Create(b.profile)
		if err != nil {
			done <- err
			return
		}
		_, err = io.Copy(f, resp.Body)
		done <- errors.Join(err, f.Close())
	}()
	lat := make([]time.Duration, b.n)
	start, sent := time.Now(), 0
	finish := func(err error) error {
		if err != nil {
			return fmt.Errorf("profile: %w", err)
		}
		fmt.Printf("\nprofile of Caddy serving %q alone, %d s, %d deliveries sent: %s\n", t.name, profileSeconds, sent, b.profile)
		return nil
	}
	for time.Since(start) < time.Minute {
		select {
		case err := <-done:
			return finish(err)
		default:
		}
		if t.memoryReplay() && sent+b.n > maxReplayEntries {
			// Its replay store is nearly full: the rest of the profile
			// sees Caddy idle.
			return finish(<-done)
		}
		if err := reqs.mint(t.account, host, b.n, b.body); err != nil {
			return err
		}
		s, err := newSender(host, b.conc)
		if err != nil {
			return err
		}
		err = s.send(*reqs, lat)
		s.close()
		if err != nil {
			return fmt.Errorf("%s: %w", t.name, err)
		}
		sent += b.n
	}
	return errors.New("profile: no answer from Caddy's admin in a minute")
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d)/1e6) }

// median is the median of v, which it sorts.
func median(v []float64) float64 {
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

func (b *bench) report(results map[string][]result) {
	med := func(name string, f func(result) float64) float64 {
		var v []float64
		for _, r := range results[name] {
			v = append(v, f(r))
		}
		return median(v)
	}
	msOf := func(f func(result) time.Duration) func(result) float64 {
		return func(r result) float64 { return float64(f(r)) / 1e6 }
	}
	fmt.Printf("\nMedians over %d rounds:\n\n", b.rounds)
	fmt.Println("| target | deliveries/s | CPU µs per delivery (Caddy) | p50 ms | p99 ms | p99.9 ms | Caddy's core busy | bench CPU µs per delivery |")
	fmt.Println("|---|--:|--:|--:|--:|--:|--:|--:|")
	for _, t := range b.targets {
		fmt.Printf("| %s | %.0f | %.2f | %.2f | %.2f | %.2f | %.0f%% | %.2f |\n", t.name,
			med(t.name, func(r result) float64 { return r.rps }),
			med(t.name, func(r result) float64 { return r.cpuUS }),
			med(t.name, msOf(func(r result) time.Duration { return r.p50 })),
			med(t.name, msOf(func(r result) time.Duration { return r.p99 })),
			med(t.name, msOf(func(r result) time.Duration { return r.p999 })),
			100*med(t.name, func(r result) float64 { return r.caddyBusy }),
			med(t.name, func(r result) float64 { return r.benchUS }))
	}

	within := func(a, base string, f func(x, y result) float64) (float64, bool) {
		ra, rb := results[a], results[base]
		if len(ra) == 0 || len(rb) == 0 {
			return 0, false
		}
		var v []float64
		for i := range ra {
			v = append(v, f(ra[i], rb[i]))
		}
		return median(v), true
	}
	goal := func(ok bool) string {
		if ok {
			return "met"
		}
		return "NOT met"
	}
	type pair struct {
		a, base string
		goal    bool
	}
	var rows []string
	for _, p := range []pair{
		{"module defaults + respond", "read+respond", true},
		{"module off/off + respond", "read+respond", false},
		{"module defaults + proxy", "proxy", true},
		{"module off/off + proxy", "proxy", false},
	} {
		rps, ok := within(p.a, p.base, func(x, y result) float64 { return x.rps / y.rps })
		if !ok {
			continue
		}
		cpu, _ := within(p.a, p.base, func(x, y result) float64 { return y.cpuUS / x.cpuUS })
		g := ""
		if p.goal {
			g = "deliveries/s ≥ 0.95: " + goal(rps >= 0.95)
		}
		rows = append(rows, fmt.Sprintf("| %s / %s | %.3f | %.3f | %s |", p.a, p.base, rps, cpu, g))
	}
	printTable("Ratios within each round, median over the rounds (deliveries/s: target/base, 1 = as fast; CPU: base/target, 1 = free, 0.9 = the target takes 11% more):",
		"| ratio | deliveries/s | CPU (base/target) | goal |\n|---|--:|--:|---|", rows)

	rows = rows[:0]
	for _, p := range []pair{
		{"module defaults + respond", "module off/off + respond", true},
		{"module defaults + proxy", "module off/off + proxy", true},
		{"module memory/off + respond", "module off/off + respond", false},
		{"module off/fallback + respond", "module off/off + respond", false},
		{"module defaults + respond", "module memory/off + respond", false},
	} {
		d, ok := within(p.a, p.base, func(x, y result) float64 { return x.cpuUS - y.cpuUS })
		if !ok {
			continue
		}
		g := ""
		if p.goal {
			g = "≤ 1.5 µs: " + goal(d <= 1.5)
		}
		rows = append(rows, fmt.Sprintf("| %s − %s | %+.2f | %s |", p.a, p.base, d, g))
	}
	printTable("Caddy's CPU per delivery, differences within each round, median over the rounds (memory/off − off/off: the memory replay store; off/fallback − off/off: the spool's success path; defaults − memory/off: the spool with the replay journal):",
		"| difference | CPU µs per delivery | goal |\n|---|--:|---|", rows)
}

// printTable prints a titled Markdown table of rows, if there are any.
func printTable(title, head string, rows []string) {
	if len(rows) == 0 {
		return
	}
	fmt.Printf("\n%s\n\n%s\n", title, head)
	for _, r := range rows {
		fmt.Println(r)
	}
}
