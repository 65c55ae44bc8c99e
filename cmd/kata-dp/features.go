package main

import (
	"context"
	"time"

	"github.com/kata-dp/kata-dp/loader"
)

// sweepInterval is how often the agent expires idle load-balanced connections.
const sweepInterval = time.Second

// xdpWatchInterval is how often xdp-mode endpoints re-check whether their veth's peer can take
// XDP frames (GRO or XDP on the peer), moving traffic between XDP and tc when it changed.
const xdpWatchInterval = 2 * time.Second

func init() {
	probeFeatures = func(context.Context) ([]Feature, error) {
		f, err := loader.Probe()
		if err != nil {
			return nil, err
		}
		fallback := func(ok bool, detail string) string {
			if ok {
				return ""
			}
			return detail
		}
		return []Feature{
			{Name: "tcx", Supported: f.TCX, Detail: fallback(f.TCX, "clsact + bpf filter fallback")},
			{Name: "sched_cls", Supported: f.SchedCLS},
			{Name: "xdp", Supported: f.XDP, Detail: fallback(f.XDP, "xdp mode falls back to tc")},
			{Name: "lpm_trie", Supported: f.LPMTrie},
			{Name: "devmap", Supported: f.DevMap},
		}, nil
	}
}
