// Package ipvstest provides what tests of ipvs tables share: a fake of the datapath's counters
// for code that prints ipvsadm listings (so they need no BPF maps), and the benchmarks' standard
// restore file.
package ipvstest

import "github.com/kata-dp/kata-dp/control/ipvs"

// Counters is an ipvs.Counters backed by maps keyed by rule id; missing
// ids give zeros. The zero value is ready to use.
type Counters struct {
	Services map[uint32]ipvs.ServiceCounters
	Servers  map[uint32]ipvs.ServerCounters
}

// Service returns the counters of service id.
func (c *Counters) Service(id uint32) ipvs.ServiceCounters { return c.Services[id] }

// Server returns the counters of real server id.
func (c *Counters) Server(id uint32) ipvs.ServerCounters { return c.Servers[id] }

// SetServer records the active and inactive connection counts of a real
// server, keeping its other counters.
func (c *Counters) SetServer(id uint32, active, inactive uint32) {
	if c.Servers == nil {
		c.Servers = map[uint32]ipvs.ServerCounters{}
	}
	s := c.Servers[id]
	s.ActiveConn, s.InActConn = active, inactive
	c.Servers[id] = s
}

var _ ipvs.Counters = (*Counters)(nil)
