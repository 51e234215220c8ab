package trivialsecwebhook

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/journal"
)

// Benchmarks of the hot path. The end-to-end comparison with plain Caddy
// is bench/run.sh; these say where the module's own time and memory go.

// benchDelivery is a production delivery whose payload pads the body to
// about size bytes.
func benchDelivery(size int) *delivery {
	d := productionDelivery()
	if pad := size - len(d.body()) - len(`, "pad": ""`); pad > 0 {
		d.payload = `{"report_id": "r-1", "pad": "` + strings.Repeat("x", pad) + `"}`
	}
	return d
}

func BenchmarkVerifyToken(b *testing.B) {
	v := testVerifier(b, nil)
	auth := productionDelivery().authorization()
	b.ReportAllocs()
	for b.Loop() {
		if _, reason := v.verifyToken(auth); reason != reasonNone {
			b.Fatal(reason)
		}
	}
}

func BenchmarkVerify(b *testing.B) {
	for _, size := range []int{1 << 10, 64 << 10, 1 << 20} {
		b.Run(fmt.Sprintf("body=%dKiB", size>>10), func(b *testing.B) {
			v := testVerifier(b, nil)
			d := benchDelivery(size)
			auth, body := d.authorization(), []byte(d.body())
			b.SetBytes(int64(len(body)))
			b.ReportAllocs()
			for b.Loop() {
				tok, reason := v.verifyToken(auth)
				if reason == reasonNone {
					_, reason = v.verifyBody(tok, body)
				}
				if reason != reasonNone {
					b.Fatal(reason)
				}
			}
		})
	}
}

type resettableBody struct{ bytes.Reader }

func (*resettableBody) Close() error { return nil }

// BenchmarkServeHTTP: the whole handler, a 1 KiB delivery, a next handler
// that reads the body and answers 200; replay off, as in the targets, or
// memory; the spool off, or in fallback mode on a file store (which the
// normal path does not write to, but for the replay journal). Deliveries
// run 32 at a time, as senders do: with memory replay and the spool, each
// waits for its reservation's group commit, which the 32 share.
func BenchmarkServeHTTP(b *testing.B) {
	for _, tc := range []struct{ replay, spool string }{{"off", "off"}, {"memory", "off"}, {"off", "fallback"}, {"memory", "fallback"}} {
		replay := tc.replay
		b.Run("replay="+replay+"/spool="+tc.spool, func(b *testing.B) {
			b.Setenv("TRIVIALSEC_TEST_SECRET", testSecret)
			h := &Handler{Account: testAccount, Secret: []string{"{env.TRIVIALSEC_TEST_SECRET}"}, Replay: &Replay{Store: replay},
				Spool: &Spool{Store: "off"}}
			h.now = func() time.Time { return testNow }
			ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
			defer cancel()
			if err := h.Provision(ctx); err != nil {
				b.Fatal(err)
			}
			defer h.Cleanup()
			h.logger = zap.NewNop()
			store := newMemoryStore(defaultReplayMaxEntries)
			if tc.spool == "fallback" {
				// The file store without a server to re-drive through:
				// ServeHTTP's normal path never needs one.
				h.Spool = &Spool{Mode: tc.spool}
				h.Spool.setDefaults()
				h.policy = h.Spool.policy()
				spool := openTestSpool(b, b.TempDir(), h.policy)
				defer spool.Destruct()
				h.spool = spool
				if replay == "memory" {
					h.journal = spool
				}
			}
			if replay == "memory" {
				h.store = store
			}
			nextHandler := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
				_, err := io.Copy(io.Discard, r.Body)
				w.WriteHeader(http.StatusOK)
				return err
			})
			// With replay on, each delivery must be a new event: the store
			// forgets them each time they all went once.
			n := 1
			if replay == "memory" {
				n = 1 << 16
			}
			auths, bodies := make([]string, n), make([][]byte, n)
			for i := range n {
				d := benchDelivery(1 << 10).withEventID(uuidString())
				auths[i], bodies[i] = d.authorization(), []byte(d.body())
			}
			var sent, replayed atomic.Int64
			b.SetBytes(int64(len(bodies[0])))
			b.ReportAllocs()
			b.SetParallelism(16) // 32 senders on 2 cores
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				// One request, its body and headers set again for each
				// delivery, so that what is timed is the handler, not the
				// test's request.
				w := httptest.NewRecorder()
				template := httptest.NewRequest(http.MethodPost, "/webhook/trivialsec", nil)
				var rb resettableBody
				for pb.Next() {
					i := int(sent.Add(1)-1) % n
					if i == 0 && n > 1 {
						store.forget()
					}
					rb.Reset(bodies[i])
					r := template.WithContext(context.WithValue(template.Context(), caddy.ReplacerCtxKey, caddy.NewReplacer()))
					r.Body, r.ContentLength = &rb, int64(len(bodies[i]))
					r.Header = http.Header{"Authorization": {auths[i]}, "Content-Length": {strconv.Itoa(len(bodies[i]))}}
					err := h.ServeHTTP(w, r, nextHandler)
					if he, ok := errors.AsType[caddyhttp.HandlerError](err); ok && he.StatusCode == http.StatusConflict {
						replayed.Add(1) // a copy met at the turn, as the store forgot
					} else if err != nil {
						b.Error(err)
						return
					}
				}
			})
			if r := replayed.Load(); r > int64(b.N/100) {
				b.Fatalf("%d of %d deliveries refused", r, b.N)
			}
		})
	}
}

// forget empties the store: the benchmark's deliveries go round again.
func (s *memoryStore) forget() {
	s.mu.Lock()
	defer s.mu.Unlock()
	clear(s.entries)
	s.expiries = s.expiries[:0]
}

// BenchmarkSpoolStartup: opening a spool store whose journal holds
// 1,000,000 live reservations, and handing them to a memory store, as Caddy
// does when it starts.
func BenchmarkSpoolStartup(b *testing.B) {
	dir := b.TempDir()
	s := openTestSpool(b, dir, testPolicy)
	exp := time.Now().Add(24 * time.Hour).UnixNano()
	const n = 1_000_000
	for i := range n {
		if err := s.journal.Write(journal.Record{Op: journal.OpAdd, ID: uuid.New(), Expires: exp + int64(i), Account: testAccount}); err != nil {
			b.Fatal(err)
		}
	}
	if err := s.Destruct(); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		s := openTestSpool(b, dir, testPolicy)
		store := newMemoryStore(defaultReplayMaxEntries)
		if err := s.keepReservations(testAccount, store); err != nil {
			b.Fatal(err)
		}
		if len(store.entries) != n {
			b.Fatalf("%d reservations, want %d", len(store.entries), n)
		}
		b.StopTimer()
		if err := s.Destruct(); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}

// BenchmarkSpoolStats: what a metrics scrape costs the file store with
// 100,000 entries waiting, under the store's lock (which deliveries being
// spooled wait for): the oldest waiting entry is kept as the index changes,
// and the index is scanned again only once that entry leaves it.
func BenchmarkSpoolStats(b *testing.B) {
	s := newFileSpool(b.TempDir(), testPolicy)
	now := time.Now()
	s.mu.Lock()
	for i := range 100_000 {
		s.schedule(spoolMeta{EventID: uuid.New(), State: statePending, SpooledAt: now.Add(-time.Duration(i) * time.Second),
			NextAttempt: now.Add(time.Hour), Account: testAccount, Size: 1000})
	}
	s.mu.Unlock()
	for b.Loop() {
		if st := s.stats(); st.pending != 100_000 || st.oldest.IsZero() {
			b.Fatalf("stats %+v", st)
		}
	}
}
