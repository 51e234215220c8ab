package trivialsecwebhook

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/trivialsec/caddy-trivialsec-webhook/internal/testredis"
)

// What the admin API's listing and summary cost each store with 100,000
// entries: five event names, one account served here and one not (its
// pending entries are parked), one entry in ten a dead letter.
//
//	go test -run '^$' -bench 'SpoolPage|SpoolSummary' -benchtime 20x .

const benchQueryEntries = 100_000

var benchQueryEvents = []string{"report_created", "report_updated", "scan_finished", "user_invited", "domain_added"}

// benchQueryEntry is the ith entry of a benchmark's store.
func benchQueryEntry(i int, now time.Time) *spoolEntry {
	e := testEntry(`{"report": 1}`)
	e.meta.Account = "served"
	if i%5 == 4 {
		e.meta.Account = "unserved"
	}
	e.meta.EventName = benchQueryEvents[i%len(benchQueryEvents)]
	e.meta.SpooledAt = now.Add(-time.Duration(benchQueryEntries-i) * time.Millisecond)
	e.meta.NextAttempt = now.Add(time.Hour)
	if i%10 == 3 {
		e.meta.State = stateDead
	}
	return e
}

// benchFileQueryStore is a file store with the benchmark's entries.
func benchFileQueryStore(b *testing.B) spoolStore {
	p := testPolicy
	p.maxSize = 1 << 40
	s := openTestSpool(b, b.TempDir(), p)
	b.Cleanup(func() { _ = s.Destruct() })
	s.register(&driver{account: "served"})
	now := time.Now()
	var wg sync.WaitGroup
	const writers = 64 // the store commits the writes under way together
	for w := range writers {
		wg.Go(func() {
			for i := w; i < benchQueryEntries; i += writers {
				if err := s.add(benchQueryEntry(i, now)); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	return s
}

// benchRedisQueryStore is a Redis store with the benchmark's entries,
// written with the add script, 1,000 to a round trip, and dead-lettered
// with the failed-attempt script.
func benchRedisQueryStore(b *testing.B) spoolStore {
	srv := testredis.Start(b)
	client, err := loadRedisClient(srv.URL())
	if err != nil {
		b.Fatal(err)
	}
	p := testPolicy
	p.maxSize = 1 << 40
	s := newRedisSpool(client, "bench:spool:", p)
	b.Cleanup(func() { _ = client.release() })
	s.register(&driver{account: "served"})
	s.lease = randomHex(16)
	if ok, err := s.holdLease("c", time.Hour, true); !ok || err != nil {
		b.Fatal(ok, err)
	}
	s.consumer = "c"
	ctx := context.Background()
	now := time.Now()
	if err := redisAddScript.Load(ctx, s.client.Client).Err(); err != nil {
		b.Fatal(err)
	}
	if err := redisFailedScript.Load(ctx, s.client.Client).Err(); err != nil {
		b.Fatal(err)
	}
	dead := make(map[string]spoolMeta)
	for start := 0; start < benchQueryEntries; start += 1000 {
		_, err := s.client.Pipelined(ctx, func(pl redis.Pipeliner) error {
			for i := start; i < start+1000; i++ {
				e := benchQueryEntry(i, now)
				_, meta, req, err := e.size()
				if err != nil {
					return err
				}
				m := &e.meta
				id := m.EventID.String()
				sfx := indexSuffix(m.EventName, m.Account)
				redisAddScript.EvalSha(ctx, pl,
					[]string{s.entryKey(id), s.prefix + "ids", s.prefix + "stats", s.streamKey(m.Account), s.doneKey(id), s.prefix + "waiting",
						s.indexKey(statePending, sfx), s.dueKey(m.Account)},
					id, meta, req, e.body, redisEntryCost(len(meta), len(req), len(e.body)), m.Account, time.Hour.Milliseconds(), p.maxSize,
					0, "", now.Sub(m.SpooledAt).Milliseconds(), m.EventName, sfx, m.Size)
				if m.State == stateDead {
					dead[id] = *m
				}
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	for _, account := range []string{"served", "unserved"} {
		stream := s.streamKey(account)
		if err := s.client.XGroupCreateMkStream(ctx, stream, redisSpoolGroup, "0").Err(); err != nil {
			b.Fatal(err)
		}
		res, err := s.client.XReadGroup(ctx, &redis.XReadGroupArgs{Group: redisSpoolGroup, Consumer: "c", Streams: []string{stream, ">"}, Count: 1 << 20, Block: -1}).Result()
		if err != nil {
			b.Fatal(err)
		}
		_, err = s.client.Pipelined(ctx, func(pl redis.Pipeliner) error {
			for _, msg := range res[0].Messages {
				id := msg.Values["id"].(string)
				m, ok := dead[id]
				if !ok {
					continue
				}
				sfx := indexSuffix(m.EventName, m.Account)
				redisFailedScript.EvalSha(ctx, pl,
					[]string{s.entryKey(id), s.prefix + "stats", stream, s.leaseKey("c"), s.prefix + "waiting",
						s.indexKey(statePending, sfx), s.indexKey(stateDead, sfx), s.dueKey(account)},
					redisSpoolGroup, "c", msg.ID, 1, stateDead, 5, 0, "upstream answered 503", s.lease, id, sfx)
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	return s
}

var benchQueryStores = map[string]func(b *testing.B) spoolStore{"file": benchFileQueryStore, "redis": benchRedisQueryStore}

// BenchmarkSpoolPage: a page of 100 entries: the first, without a filter;
// the first dead letters of one event name; and one near the end.
func BenchmarkSpoolPage(b *testing.B) {
	for _, store := range []string{"file", "redis"} {
		b.Run("store="+store, func(b *testing.B) {
			s := benchQueryStores[store](b)
			// Every page, once; the cursor of the 150th entry from the end.
			var near, after *spoolCursor
			listed := 0
			for {
				page, total, err := s.page(spoolFilter{}, after, maxSpoolPage)
				if err != nil || total != benchQueryEntries {
					b.Fatalf("%d entries, %v", total, err)
				}
				for i := range page {
					if listed++; listed == benchQueryEntries-150 {
						c := cursorOf(&page[i])
						near = &c
					}
				}
				if len(page) < maxSpoolPage {
					break
				}
				c := cursorOf(&page[len(page)-1])
				after = &c
			}
			if listed != benchQueryEntries || near == nil {
				b.Fatalf("the pages list %d entries", listed)
			}
			for _, c := range []struct {
				name  string
				f     spoolFilter
				after *spoolCursor
				want  int
			}{
				{"first", spoolFilter{}, nil, 100},
				{"state=dead&event_name=user_invited", spoolFilter{states: []string{stateDead}, eventName: "user_invited"}, nil, 100},
				{"deep", spoolFilter{}, near, 100},
			} {
				b.Run(c.name, func(b *testing.B) {
					for b.Loop() {
						page, _, err := s.page(c.f, c.after, 100)
						if err != nil || len(page) != c.want {
							b.Fatalf("%d entries, %v", len(page), err)
						}
					}
				})
			}
		})
	}
}

// BenchmarkSpoolSummary: the summary.
func BenchmarkSpoolSummary(b *testing.B) {
	for _, store := range []string{"file", "redis"} {
		b.Run("store="+store, func(b *testing.B) {
			s := benchQueryStores[store](b)
			for b.Loop() {
				sum, err := s.summary()
				if err != nil || sum.states[stateDead].Entries != benchQueryEntries/10 {
					b.Fatalf("%v, %v", sum.states, err)
				}
			}
			sum, _ := s.summary()
			b.Logf("%v", fmt.Sprint(sum.states))
		})
	}
}
