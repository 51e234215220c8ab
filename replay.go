package trivialsecwebhook

import (
	"container/heap"
	"context"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/google/uuid"
)

// A token binds only event_id, not the payload, and lives a day: a captured
// delivery could be replayed, or replayed with another payload, until it
// expires. The replay store remembers each accepted event ID until its
// token's exp + leeway, and refuses it meanwhile (docs/checks.md, Replay protection).

// defaultReplayMaxEntries caps the memory replay store. An entry costs 64 to
// 84 bytes of heap, map and expiry heap together (BenchmarkMemoryStoreFootprint:
// 64 at 100,000 entries, 84 at 1,000,000), so a full store takes about 84 MB.
// Only deliveries that passed every check take an entry, so an attacker
// without a secret cannot fill it.
const defaultReplayMaxEntries = 1_000_000

// replayStore is where accepted event IDs are kept: memory (one process) or
// Redis (every instance behind a load balancer).
type replayStore interface {
	// reserve claims id until expires. Of concurrent reservations of one
	// id, exactly one gets replayReserved. An error means the store could
	// not answer: the caller fails closed.
	reserve(ctx context.Context, id uuid.UUID, expires, now time.Time) (reservation, replayResult, error)
	// release gives the reservation back, if it is still the one made.
	release(ctx context.Context, id uuid.UUID, r reservation) error
}

// reservation identifies one reservation, so that releasing it never
// removes another.
type reservation struct {
	expires int64  // memory: the entry's expiry, Unix nanoseconds
	token   string // redis: the random value stored under the key
}

// replayResult is what a reservation came to.
type replayResult uint8

const (
	replayReserved replayResult = iota
	replayDuplicate
	replayFull
)

// memoryStore is the per-process replay store: a map of reserved event IDs
// and a min-heap of their expiries, so that expired entries leave in
// O(log n) each, without a goroutine or a full sweep.
type memoryStore struct {
	mu         sync.Mutex
	entries    map[uuid.UUID]int64 // event ID -> expiry, Unix nanoseconds
	expiries   expiryHeap
	maxEntries int
	preloaded  map[string]bool // the spool stores whose reservations it holds
}

func newMemoryStore(maxEntries int) *memoryStore {
	return &memoryStore{entries: make(map[uuid.UUID]int64), maxEntries: maxEntries, preloaded: make(map[string]bool)}
}

// preload takes in the reservations a spool store (named by its directory)
// kept across a restart, once: load calls add with each reservation made,
// and release with each given back, in the order they were (expiries in
// Unix nanoseconds).
func (s *memoryStore) preload(key string, load func(add, release func(id uuid.UUID, expires int64)) error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.preloaded[key] {
		return nil
	}
	// The expiries are appended, and made a heap once, at the end: O(n),
	// not a push (and an allocation) for each.
	err := load(func(id uuid.UUID, expires int64) {
		if _, taken := s.entries[id]; !taken {
			s.entries[id] = expires
			s.expiries = append(s.expiries, expiry{id: id, at: expires})
		}
	}, func(id uuid.UUID, expires int64) {
		if s.entries[id] == expires {
			delete(s.entries, id) // its heap element is skipped at its time
		}
	})
	heap.Init(&s.expiries)
	if err == nil {
		s.preloaded[key] = true
	}
	return err
}

func (s *memoryStore) reserve(_ context.Context, id uuid.UUID, expires, now time.Time) (reservation, replayResult, error) {
	exp, cutoff := expires.UnixNano(), now.UnixNano()
	r := reservation{expires: exp}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.expire(cutoff)
	if _, taken := s.entries[id]; taken {
		return r, replayDuplicate, nil
	}
	if exp <= cutoff {
		// The token expired (exp + leeway passed) between the token check
		// and now, as the clock moved on: nothing to remember.
		return r, replayReserved, nil
	}
	if len(s.entries) >= s.maxEntries {
		return r, replayFull, nil
	}
	s.entries[id] = exp
	heap.Push(&s.expiries, expiry{id: id, at: exp})
	return r, replayReserved, nil
}

func (s *memoryStore) release(_ context.Context, id uuid.UUID, r reservation) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if exp, ok := s.entries[id]; ok && exp == r.expires {
		delete(s.entries, id)
	}
	// Its heap element stays until its time and is then skipped. Released
	// entries are rare (downstream failures), but keep the heap bounded.
	if len(s.expiries) > 2*len(s.entries)+1024 {
		s.rebuild()
	}
	return nil
}

// expire drops every entry whose expiry is not after cutoff.
func (s *memoryStore) expire(cutoff int64) {
	for len(s.expiries) > 0 && s.expiries[0].at <= cutoff {
		e := heap.Pop(&s.expiries).(expiry)
		if s.entries[e.id] == e.at {
			delete(s.entries, e.id)
		}
	}
}

func (s *memoryStore) rebuild() {
	s.expiries = s.expiries[:0]
	for id, at := range s.entries {
		s.expiries = append(s.expiries, expiry{id: id, at: at})
	}
	heap.Init(&s.expiries)
}

func (s *memoryStore) setMaxEntries(n int) {
	s.mu.Lock()
	s.maxEntries = n
	s.mu.Unlock()
}

// Destruct lets the usage pool drop the store with the last config using it.
func (s *memoryStore) Destruct() error { return nil }

type expiry struct {
	id uuid.UUID
	at int64
}

type expiryHeap []expiry

func (h expiryHeap) Len() int           { return len(h) }
func (h expiryHeap) Less(i, j int) bool { return h[i].at < h[j].at }
func (h expiryHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *expiryHeap) Push(x any)        { *h = append(*h, x.(expiry)) }
func (h *expiryHeap) Pop() any {
	old := *h
	e := old[len(old)-1]
	*h = old[:len(old)-1]
	return e
}

// replayStores keeps each store across config reloads: the new config takes
// the store over from the old one, so that a reload forgets no accepted
// delivery and opens no new Redis connections. The loaders, loadMemoryStore
// and loadRedisStore, make the keys.
var replayStores = caddy.NewUsagePool()

// loadMemoryStore takes the account's memory store over from an earlier
// config, or makes it, and returns it with its key in replayStores.
func loadMemoryStore(account string, maxEntries int) (*memoryStore, string, error) {
	key := "memory:" + account
	v, loaded, err := replayStores.LoadOrNew(key, func() (caddy.Destructor, error) {
		return newMemoryStore(maxEntries), nil
	})
	if err != nil {
		return nil, "", err
	}
	s := v.(*memoryStore)
	if loaded {
		s.setMaxEntries(maxEntries)
	}
	return s, key, nil
}
