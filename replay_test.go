package trivialsecwebhook

import (
	"context"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
)

func TestMemoryStore(t *testing.T) {
	now := testNow
	exp := now.Add(24 * time.Hour)
	a, b, c := uuid.New(), uuid.New(), uuid.New()

	t.Run("reserve_then_duplicate", func(t *testing.T) {
		s := newMemoryStore(10)
		if got := s.try(a, exp, now); got != replayReserved {
			t.Fatalf("first: %d", got)
		}
		if got := s.try(a, exp, now.Add(time.Hour)); got != replayDuplicate {
			t.Fatalf("second: %d", got)
		}
	})
	t.Run("expires_at_deadline", func(t *testing.T) {
		s := newMemoryStore(10)
		s.try(a, exp, now)
		if got := s.try(a, exp, exp.Add(-time.Nanosecond)); got != replayDuplicate {
			t.Fatalf("just before expiry: %d", got)
		}
		if got := s.try(a, exp.Add(time.Hour), exp); got != replayReserved {
			t.Fatalf("at expiry: %d", got)
		}
		if len(s.entries) != 1 {
			t.Fatalf("len %d after expiry and new reservation", len(s.entries))
		}
	})
	t.Run("full_refuses_until_expiry", func(t *testing.T) {
		s := newMemoryStore(2)
		s.try(a, now.Add(time.Minute), now)
		s.try(b, exp, now)
		if got := s.try(c, exp, now); got != replayFull {
			t.Fatalf("third of two: %d", got)
		}
		if got := s.try(a, exp, now); got != replayDuplicate {
			t.Fatalf("a duplicate is a duplicate even when full: %d", got)
		}
		if got := s.try(c, exp, now.Add(time.Minute)); got != replayReserved {
			t.Fatalf("after a's expiry: %d", got)
		}
	})
	t.Run("release_only_own_reservation", func(t *testing.T) {
		s := newMemoryStore(10)
		s.try(a, exp, now)
		s.releaseAt(a, exp.Add(time.Second)) // not ours: another expiry
		if got := s.try(a, exp, now); got != replayDuplicate {
			t.Fatalf("released someone else's reservation: %d", got)
		}
		s.releaseAt(a, exp)
		if got := s.try(a, exp, now); got != replayReserved {
			t.Fatalf("after release: %d", got)
		}
	})
	t.Run("released_entry_heap_stays_bounded", func(t *testing.T) {
		s := newMemoryStore(10)
		for range 5000 {
			s.try(a, exp, now)
			s.releaseAt(a, exp)
		}
		if n := len(s.expiries); n > 1024+2 {
			t.Fatalf("heap holds %d elements for %d entries", n, len(s.entries))
		}
	})
	t.Run("reserved_in_past_is_not_kept", func(t *testing.T) {
		s := newMemoryStore(10)
		if got := s.try(a, now, now); got != replayReserved || len(s.entries) != 0 {
			t.Fatalf("got %d, len %d", got, len(s.entries))
		}
	})
}

// TestMemoryStoreConcurrent: of many concurrent reservations of one ID,
// exactly one wins.
func TestMemoryStoreConcurrent(t *testing.T) {
	s := newMemoryStore(1000)
	exp := testNow.Add(time.Hour)
	for range 50 {
		id := uuid.New()
		exactlyOneWins(t, 16, func() bool { return s.try(id, exp, testNow) == replayReserved })
	}
}

// exactlyOneWins runs reserve from n goroutines at once, and fails the test
// unless exactly one of them reserved.
func exactlyOneWins(t *testing.T, n int, reserve func() bool) {
	t.Helper()
	var wins atomic.Int32
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if reserve() {
				wins.Add(1)
			}
		}()
	}
	wg.Wait()
	if wins.Load() != 1 {
		t.Fatalf("%d of %d concurrent reservations won", wins.Load(), n)
	}
}

// TestMemoryStoreSurvivesReload: a new config takes the store over from
// the old one before the old one is cleaned up.
func TestMemoryStoreSurvivesReload(t *testing.T) {
	old, key, err := loadMemoryStore("reload-test", 10)
	if err != nil {
		t.Fatal(err)
	}
	old.try(uuid.Nil, testNow.Add(time.Hour), testNow)
	next, nextKey, err := loadMemoryStore("reload-test", 20)
	if err != nil {
		t.Fatal(err)
	}
	if nextKey != key {
		t.Fatalf("keys %q and %q for one account", key, nextKey)
	}
	if _, err := replayStores.Delete(key); err != nil { // the old config's Cleanup
		t.Fatal(err)
	}
	if next != old || next.try(uuid.Nil, testNow.Add(time.Hour), testNow) != replayDuplicate {
		t.Fatal("the reloaded config forgot an accepted event")
	}
	if next.maxEntries != 20 {
		t.Fatalf("max entries %d, want the new config's 20", next.maxEntries)
	}
	if deleted, _ := replayStores.Delete(key); !deleted {
		t.Fatal("the store outlived its last config")
	}
}

func BenchmarkMemoryStoreParallel(b *testing.B) {
	s := newMemoryStore(defaultReplayMaxEntries)
	now := time.Now()
	exp := now.Add(time.Hour)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if s.try(uuid.New(), exp, now) == replayFull {
				s.mu.Lock()
				clear(s.entries)
				s.expiries = s.expiries[:0]
				s.mu.Unlock()
			}
		}
	})
}

// BenchmarkMemoryStoreFootprint reports the heap bytes one entry costs, map
// and expiry heap together, in a store of 100,000 entries.
func BenchmarkMemoryStoreFootprint(b *testing.B) {
	const n = 100_000
	now := time.Now()
	for range b.N {
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		s := newMemoryStore(n)
		for i := range n {
			s.try(uuid.New(), now.Add(time.Duration(i)*time.Second), now)
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/n, "bytes/entry")
		runtime.KeepAlive(s)
	}
}

// try reserves, as ServeHTTP does, and says only how it went.
func (s *memoryStore) try(id uuid.UUID, expires, now time.Time) replayResult {
	_, result, err := s.reserve(context.Background(), id, expires, now)
	if err != nil {
		panic(err)
	}
	return result
}

// releaseAt releases the reservation made until expires.
func (s *memoryStore) releaseAt(id uuid.UUID, expires time.Time) {
	_ = s.release(context.Background(), id, reservation{expires: expires.UnixNano()})
}
