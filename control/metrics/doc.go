// Package metrics is the agent's observability surface on its metrics listener: the
// Prometheus registry (/metrics), liveness (/healthz) and readiness (/readyz).
//
// The registry holds the agent's own counters (operations and their latencies, reconcile
// results, QMP errors, runs of the node tasks) and collectors that read the dataplane at scrape
// time: per-endpoint packets, bytes and drops by reason (with the mode the endpoint runs in),
// per load-balanced service and real server packets, bytes and connections, each sandbox's
// connection-table fill against its capacity, the kernel memory of its BPF maps, and the
// sandboxes by state. docs/metrics.md lists every metric, its labels and what to do when it
// moves.
//
// Readiness is a list of named checks (Health.Add): the agent adds "state" (the saved state is
// loaded), "datapaths" (every saved sandbox's datapath was re-adopted or marked unhealthy) and
// "api" (the API socket serves); other long-running parts (Kata discovery) add their own.
//
// The listener serves without authentication, so Listen refuses a non-loopback address unless
// the caller allows it explicitly (the agent's --metrics-allow-remote).
//
// A Metrics and a Health are safe for concurrent use; sources are added (AddSources) once,
// before the listener serves scrapes that need them. Scrape-time reads go through the
// dataplane's read guard (control/dataplane), never through the control plane's sandbox
// locks, so a scrape never waits for a hot-plug and never reads a sandbox being removed.
package metrics
