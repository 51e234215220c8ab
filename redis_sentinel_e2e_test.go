package trivialsecwebhook

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testredis"
)

// The phases of TestSentinelFailoverEndToEnd, in order.
const (
	phaseReplicated = iota // the replica gets every write
	phaseCut               // the replica gets none of the primary's writes
	phaseFailover          // from the primary's death until the Sentinels promoted the replica and the old primary is back as its replica, in sync
	phaseAfter             // the Sentinels' primary has the other server as its replica again
	phases
)

var phaseNames = [phases]string{"replicated", "cut", "failover", "after"}

// sent is one delivery of TestSentinelFailoverEndToEnd.
type sent struct {
	id, body string
	status   int // 0: no answer
	phase    int // when it was sent (its writes may fall in the next one)
}

// TestSentinelFailoverEndToEnd: the module, with its replay store and its
// spool on a Sentinel-watched Redis with wait_replicas=1, in front of an
// upstream that is down (every delivery accepted is one spooled), takes
// deliveries from four senders at once while the replica is cut off from
// the primary (a partition: Redis replicates asynchronously, so the
// primary takes writes the replica never gets), then the primary is
// killed and the Sentinels promote the replica, then the old primary
// comes back as its replica, as an operator brings it back (started as a
// replica, never as an empty primary the Sentinels might promote: see
// testredis.RestartReplicaOf). Every delivery answered 2xx, in any phase,
// must be delivered exactly once when the upstream is back, and a copy of
// it must be refused (409). Deliveries answered otherwise (503, 502) are
// the sender's to send again, and are not checked.
func TestSentinelFailoverEndToEnd(t *testing.T) {
	s := testredis.StartSentinels(t)
	primary, replica := s.Servers[0], s.Servers[1]
	t.Setenv("TRIVIALSEC_IT_REDIS", s.URL()+"&wait_replicas=1&wait_timeout=200ms")
	g := startSpoolRig(t, "replay redis {env.TRIVIALSEC_IT_REDIS}\n\t\tspool {\n\t\t\tstore redis {env.TRIVIALSEC_IT_REDIS}\n\t\t\tbackoff 10ms 50ms\n\t\t}")
	g.up.Down()

	var (
		phase    atomic.Int32
		budget   atomic.Int32 // sends left: the load is bounded
		accepted [phases]atomic.Int32
		answered [phases]atomic.Int32
		mu       sync.Mutex
		all      []sent
		stop     = make(chan struct{})
		wg       sync.WaitGroup
	)
	budget.Store(20000)
	for range 4 {
		wg.Go(func() {
			for budget.Add(-1) >= 0 {
				select {
				case <-stop:
					return
				default:
				}
				d := sent{id: uuid.NewString(), phase: int(phase.Load())}
				d.body, d.status = sendDelivery(g.url, d.id)
				answered[d.phase].Add(1)
				if d.status/100 == 2 {
					accepted[d.phase].Add(1)
				}
				mu.Lock()
				all = append(all, d)
				mu.Unlock()
			}
		})
	}
	stopped := false
	stopSenders := func() {
		if !stopped {
			stopped = true
			close(stop)
			wg.Wait()
		}
	}
	defer stopSenders()
	// until polls ok for at most a minute, and fails the test then.
	until := func(what string, ok func() bool) {
		t.Helper()
		for deadline := time.Now().Add(time.Minute); !ok(); time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) || budget.Load() <= 0 {
				t.Fatalf("not so within a minute, or the senders' budget is spent: %s", what)
			}
		}
	}

	until("50 deliveries accepted with the replica up", func() bool { return accepted[phaseReplicated].Load() >= 50 })
	primary.CutReplicas()
	phase.Store(phaseCut)
	until("40 deliveries answered with the replica cut off", func() bool { return answered[phaseCut].Load() >= 40 })
	phase.Store(phaseFailover)
	old := s.KillMaster()
	if old != primary {
		t.Fatalf("the Sentinels named port %d, not the primary %d", old.Port, primary.Port)
	}
	if promoted := s.WaitFailover(old); promoted != replica {
		t.Fatalf("the Sentinels promoted port %d, not the replica %d", promoted.Port, replica.Port)
	}
	if now := s.Rejoin(old, replica); now != replica {
		// Under load, a Sentinel may judge the replica it just promoted
		// down; the old primary, in sync, is promoted then, with the data.
		t.Logf("the Sentinels failed over again, to port %d, the old primary, back in sync", now.Port)
	}
	phase.Store(phaseAfter)
	until("50 deliveries accepted after the failover", func() bool { return accepted[phaseAfter].Load() >= 50 })
	stopSenders()

	var statuses [phases]map[int]int
	for i := range statuses {
		statuses[i] = map[int]int{}
	}
	var ids []string
	byID := map[string]sent{}
	for _, d := range all {
		statuses[d.phase][d.status]++
		g.sent[d.id] = d.body
		byID[d.id] = d
		if d.status/100 == 2 {
			ids = append(ids, d.id)
		}
	}
	for i, counts := range statuses {
		t.Logf("%-10s answers by status: %v", phaseNames[i], counts)
	}

	if err := g.up.Up(); err != nil {
		t.Fatal(err)
	}
	taken, err := g.up.WaitTaken(ids, 30*time.Second)
	if err != nil {
		t.Error(err)
	}
	var lost, twice [phases]int
	for _, id := range ids {
		switch n := taken[id]; {
		case n == 0:
			lost[byID[id].phase]++
		case n > 1:
			twice[byID[id].phase]++
		}
	}
	// A copy of each accepted delivery, now the upstream is up: one
	// accepted would be delivered twice.
	var copied [phases]int
	copyStatuses := map[int]int{}
	for _, id := range ids {
		_, status := sendDelivery(g.url, id)
		copyStatuses[status]++
		if status != http.StatusConflict {
			copied[byID[id].phase]++
		}
	}
	t.Logf("copies of the %d accepted deliveries, answers by status: %v", len(ids), copyStatuses)
	for i := range phases {
		if lost[i] != 0 || twice[i] != 0 || copied[i] != 0 {
			t.Errorf("%s: of %d deliveries answered 2xx, %d never delivered, %d delivered more than once, and %d copies accepted",
				phaseNames[i], accepted[i].Load(), lost[i], twice[i], copied[i])
		}
	}
}

// sendDelivery sends a genuine delivery of event id to url, as the sender
// does,
// and returns its body and the status it was answered with (0: none).
// It may run outside the test's goroutine: it never fails the test.
func sendDelivery(url, id string) (body string, status int) {
	d := productionDelivery().withEventID(id).at(time.Now())
	d.payload = fmt.Sprintf(`{"report_id": "%s", "name": "caf\u00e9"}`, uuid.NewString())
	body = d.body()
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		return body, 0
	}
	req.Header.Set("Authorization", d.authorization())
	req.Header.Set("User-Agent", "Trivial Security")
	resp, err := senderClient.Do(req)
	if err != nil {
		return body, 0
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return body, resp.StatusCode
}
