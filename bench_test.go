package trivialsecwebhook

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
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
// normal path does not write to, but for the replay journal).
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
				h.store = newMemoryStore(defaultReplayMaxEntries)
			}
			next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
				_, err := io.Copy(io.Discard, r.Body)
				w.WriteHeader(http.StatusOK)
				return err
			})
			d := benchDelivery(1 << 10)
			auth, body := d.authorization(), []byte(d.body())
			// With replay on, each delivery must be a new event.
			var auths []string
			var bodies [][]byte
			if replay == "memory" {
				for range 1 << 16 {
					d := benchDelivery(1 << 10).withEventID(uuidString())
					auths, bodies = append(auths, d.authorization()), append(bodies, []byte(d.body()))
				}
			}
			// One request, its body and headers set again for each delivery,
			// so that what is timed is the handler, not the test's request.
			w := httptest.NewRecorder()
			template := httptest.NewRequest(http.MethodPost, "/webhook/trivialsec", nil)
			var rb resettableBody
			b.SetBytes(int64(len(body)))
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				a, bd := auth, body
				if replay == "memory" {
					if i == len(auths) {
						b.StopTimer()
						h.store = newMemoryStore(defaultReplayMaxEntries)
						i = 0
						b.StartTimer()
					}
					a, bd = auths[i], bodies[i]
					i++
				}
				rb.Reset(bd)
				r := template.WithContext(context.WithValue(template.Context(), caddy.ReplacerCtxKey, caddy.NewReplacer()))
				r.Body, r.ContentLength = &rb, int64(len(bd))
				r.Header = http.Header{"Authorization": {a}, "Content-Length": {strconv.Itoa(len(bd))}}
				if err := h.ServeHTTP(w, r, next); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
