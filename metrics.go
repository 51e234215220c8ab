package trivialsecwebhook

import (
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// The collectors live at package level, so that counts survive config
// reloads; each config registers them on its own registry. Label values come
// from fixed sets: the reason codes and the 15 event names.
var (
	requestsTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy",
		Subsystem: "trivialsec_webhook",
		Name:      "requests_total",
		Help:      "Webhook requests by result (accepted, refused) and reason code (none when accepted).",
	}, []string{"result", "reason"})
	eventsTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy",
		Subsystem: "trivialsec_webhook",
		Name:      "events_total",
		Help:      "Accepted webhook deliveries by event name.",
	}, []string{"event_name"})

	// The spool: what it holds (spoolGauges), and what it did.
	replayJournalPending = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "caddy",
		Subsystem: "trivialsec_webhook",
		Name:      "replay_journal_pending",
		Help:      "Replay reservations and releases written to the replay journal but not yet on disk. Deliveries wait for theirs; a value that stays high means the disk is slow.",
	}, journalPending)
	replayJournalErrors = spoolCounter("replay_journal_errors_total", "Replay reservations the replay journal could not write to disk: the delivery went on, and a restart forgets its reservation.")
	spoolSpooled        = spoolCounter("spool_spooled_total", "Deliveries written to the spool.")
	spoolRedelivered    = spoolCounter("spool_redelivered_total", "Spooled deliveries the next handler took on a re-drive.")
	spoolDeadLettered   = spoolCounter("spool_dead_lettered_total", "Spooled deliveries turned into dead letters.")
	spoolAttempts       = spoolCounter("spool_attempts_total", "Re-drives of spooled deliveries.")
	spoolCommits        = spoolCounter("spool_commits_total", "Commits (each with its fsyncs) of the spool's file store; writes made at once share one.")
	spoolTakenOver      = spoolCounter("spool_taken_over_total", "Spooled deliveries this instance took over from another that left them unfinished for claim_after (Redis store).")
	spoolHeld           = spoolCounter("spool_held_total", "Deliveries held on this instance's disk, unchecked for replay, while the Redis replay store did not answer.")

	// The counters of every label value, resolved once: no lookup on the
	// hot path, and every series present from the start.
	acceptedCounter = requestsTotal.WithLabelValues("accepted", "none")
	refusedCounters [reasonCount]prometheus.Counter
	eventCounters   [len(eventNames)]prometheus.Counter
)

func init() {
	for r := reasonMethodNotAllowed; r < reasonCount; r++ {
		refusedCounters[r] = requestsTotal.WithLabelValues("refused", r.String())
	}
	for i, name := range eventNames {
		eventCounters[i] = eventsTotal.WithLabelValues(name)
	}
}

// spoolGauges reports what the spool holds, asked of each store at every
// scrape: the sum over the spool stores of the process. A Redis store is
// shared: each instance reports all of it.
type spoolGauges struct{}

var (
	spoolEntriesDesc = prometheus.NewDesc("caddy_trivialsec_webhook_spool_entries",
		"Deliveries held in the spool, by state (pending, parked: no handler serves their account, dead).", []string{"state"}, nil)
	spoolBytesDesc = prometheus.NewDesc("caddy_trivialsec_webhook_spool_bytes",
		"Bytes held in the spool: requests and bodies.", nil, nil)
	spoolOldestDesc = prometheus.NewDesc("caddy_trivialsec_webhook_spool_oldest_pending_seconds",
		"How long the oldest delivery waiting in the spool (pending or parked, not dead) has waited since it was spooled; 0 when none waits.", nil, nil)
	spoolFullDesc = prometheus.NewDesc("caddy_trivialsec_webhook_spool_full_ratio",
		"How full the fullest spool store is: the bytes it holds over its max_size, 0 to 1. A store that is full answers what it cannot take with 502.", nil, nil)
	spoolUpDesc = prometheus.NewDesc("caddy_trivialsec_webhook_spool_up",
		"1 when every spool store of the process takes deliveries; 0 when one cannot be opened or does not answer, and its routes run without the spool.", nil, nil)
	// Its label values are the accounts of the handlers the stores
	// re-drive through: config-defined.
	spoolBreakerOpenDesc = prometheus.NewDesc("caddy_trivialsec_webhook_spool_breaker_open",
		"Routes of an account (its handler's servers) whose re-drives fail, so that its spooled deliveries wait and one at a time goes through as a probe; 0 when none.", []string{"account"}, nil)
)

func (spoolGauges) Describe(ch chan<- *prometheus.Desc) {
	ch <- spoolEntriesDesc
	ch <- spoolBytesDesc
	ch <- spoolOldestDesc
	ch <- spoolFullDesc
	ch <- spoolUpDesc
	ch <- spoolBreakerOpenDesc
}

func (spoolGauges) Collect(ch chan<- prometheus.Metric) {
	var sum spoolStats
	up, full := 1.0, 0.0
	open := make(map[string]int)
	eachSpool(func(s spoolStore) bool {
		if b, ok := s.(interface{ openBreakers(map[string]int) }); ok {
			b.openBreakers(open)
		}
		st := s.stats()
		sum.pending, sum.parked, sum.dead, sum.bytes = sum.pending+st.pending, sum.parked+st.parked, sum.dead+st.dead, sum.bytes+st.bytes
		if st.maxBytes > 0 {
			full = max(full, float64(st.bytes)/float64(st.maxBytes))
		}
		if !st.oldest.IsZero() && (sum.oldest.IsZero() || st.oldest.Before(sum.oldest)) {
			sum.oldest = st.oldest
		}
		if st.down {
			up = 0
		}
		return true
	})
	var waited float64
	if !sum.oldest.IsZero() {
		waited = max(0, time.Since(sum.oldest).Seconds())
	}
	ch <- prometheus.MustNewConstMetric(spoolEntriesDesc, prometheus.GaugeValue, float64(sum.pending), statePending)
	ch <- prometheus.MustNewConstMetric(spoolEntriesDesc, prometheus.GaugeValue, float64(sum.parked), stateParked)
	ch <- prometheus.MustNewConstMetric(spoolEntriesDesc, prometheus.GaugeValue, float64(sum.dead), stateDead)
	ch <- prometheus.MustNewConstMetric(spoolBytesDesc, prometheus.GaugeValue, float64(sum.bytes))
	ch <- prometheus.MustNewConstMetric(spoolOldestDesc, prometheus.GaugeValue, waited)
	ch <- prometheus.MustNewConstMetric(spoolFullDesc, prometheus.GaugeValue, full)
	ch <- prometheus.MustNewConstMetric(spoolUpDesc, prometheus.GaugeValue, up)
	for account, n := range open {
		ch <- prometheus.MustNewConstMetric(spoolBreakerOpenDesc, prometheus.GaugeValue, float64(n), account)
	}
}

// registerMetrics adds the collectors to a config's registry. The same
// collectors registered again (another handler, the same config) are fine.
func registerMetrics(registry *prometheus.Registry) error {
	if registry == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{requestsTotal, eventsTotal, spoolGauges{}, replayJournalPending, replayJournalErrors,
		spoolSpooled, spoolRedelivered, spoolDeadLettered, spoolAttempts, spoolCommits, spoolTakenOver, spoolHeld} {
		if err := registry.Register(c); err != nil {
			if _, ok := errors.AsType[prometheus.AlreadyRegisteredError](err); !ok {
				return err
			}
		}
	}
	return nil
}

// journalPending sums what the replay journals of the file stores have not
// synced yet.
func journalPending() float64 {
	var n int64
	eachSpool(func(s spoolStore) bool {
		if f, ok := s.(*fileSpool); ok {
			n += f.journalPending()
		}
		return true
	})
	return float64(n)
}

func spoolCounter(name, help string) prometheus.Counter {
	return prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "caddy",
		Subsystem: "trivialsec_webhook",
		Name:      name,
		Help:      help,
	})
}
