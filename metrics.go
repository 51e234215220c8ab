package trivialsecwebhook

import (
	"errors"

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

// registerMetrics adds the collectors to a config's registry. The same
// collectors registered again (another handler, the same config) are fine.
func registerMetrics(registry *prometheus.Registry) error {
	if registry == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{requestsTotal, eventsTotal} {
		if err := registry.Register(c); err != nil {
			if _, ok := errors.AsType[prometheus.AlreadyRegisteredError](err); !ok {
				return err
			}
		}
	}
	return nil
}
