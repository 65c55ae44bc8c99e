package kata

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// ErrBadState is returned (wrapped) for a persist.json that cannot be used: not JSON,
// truncated, or JSON of another shape (no network namespace).
var ErrBadState = errors.New("unusable Kata sandbox state")

// The structs below mirror the fields kata-dp reads of Kata's persistapi types
// (kata-containers src/runtime/virtcontainers/persist/api/). Kata marshals them with Go's
// default field names, so no tags are needed; json matches them case-insensitively.

// SandboxState mirrors persistapi.SandboxState (sandbox.go).
type SandboxState struct {
	PersistVersion  uint
	State           string // "ready", "running", "paused", "stopped"
	HypervisorState HypervisorState
	Network         NetworkInfo
}

// HypervisorState mirrors the fields of persistapi.HypervisorState (hypervisor.go) kata-dp uses.
type HypervisorState struct {
	Type string // "qemu", "clh", "fc", ...
	Pid  int    // the hypervisor's pid
}

// NetworkInfo mirrors persistapi.NetworkInfo (network.go). NetworkID is the netns path.
type NetworkInfo struct {
	NetworkID      string
	Endpoints      []NetworkEndpoint
	NetworkCreated bool
}

// NetworkEndpoint mirrors persistapi.NetworkEndpoint: one of the pointers is set, by Type.
type NetworkEndpoint struct {
	Type    string           // "virtual" (veth), "macvlan", "ipvlan", "tap", "vhost-user", ...
	Veth    *PairEndpoint    `json:",omitempty"`
	Macvlan *PairEndpoint    `json:",omitempty"`
	IPVlan  *PairEndpoint    `json:",omitempty"`
	Netkit  *PairEndpoint    `json:",omitempty"`
	Tap     *json.RawMessage `json:",omitempty"`
}

// PairEndpoint mirrors persistapi.VethEndpoint (and the macvlan, ipvlan and netkit ones, which
// have the same shape).
type PairEndpoint struct {
	NetPair NetworkInterfacePair
}

// NetworkInterfacePair mirrors persistapi.NetworkInterfacePair: TapInterface is embedded in
// Kata's struct, so its fields (ID, Name, TAPIface) sit at the top level of the JSON object.
type NetworkInterfacePair struct {
	ID                   string
	Name                 string           // "br<N>_kata" (Kata's bridge name, unused in tcfilter)
	TAPIface             NetworkInterface // "tap<N>_kata"
	VirtIface            NetworkInterface // the veth in the pod netns ("eth0")
	NetInterworkingModel int
}

// NetworkInterface mirrors persistapi.NetworkInterface. Addrs (netlink.Addr values) are not
// read: the addresses are taken from the veth itself.
type NetworkInterface struct {
	Name     string
	HardAddr string
}

// Pair is one veth/tap pair of a sandbox as persist.json names it.
type Pair struct {
	Type string // Kata's endpoint type
	Veth string // VirtIface.Name
	Tap  string // TAPIface.Name
	MAC  string // TAPIface.HardAddr: the MAC Kata gave the guest (the veth's)
}

// Pairs lists the endpoints of the sandbox that Kata joins to a tap. Others (vhost-user,
// physical, tap endpoints) have no pair and are returned in others by type.
func (s *SandboxState) Pairs() (pairs []Pair, others []string) {
	for _, e := range s.Network.Endpoints {
		var p *PairEndpoint
		for _, c := range []*PairEndpoint{e.Veth, e.Macvlan, e.IPVlan, e.Netkit} {
			if c != nil {
				p = c
				break
			}
		}
		if p == nil || p.NetPair.VirtIface.Name == "" || p.NetPair.TAPIface.Name == "" {
			others = append(others, e.Type)
			continue
		}
		pairs = append(pairs, Pair{Type: e.Type, Veth: p.NetPair.VirtIface.Name, Tap: p.NetPair.TAPIface.Name, MAC: p.NetPair.TAPIface.HardAddr})
	}
	return pairs, others
}

// Parse decodes a persist.json. It fails with ErrBadState when the bytes are not a JSON object
// of Kata's shape: at least a network namespace path.
func Parse(b []byte) (*SandboxState, error) {
	var s SandboxState
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadState, err)
	}
	if s.Network.NetworkID == "" {
		return nil, fmt.Errorf("%w: no Network.NetworkID (netns path): not a Kata sandbox state", ErrBadState)
	}
	if !filepath.IsAbs(s.Network.NetworkID) {
		return nil, fmt.Errorf("%w: Network.NetworkID %q is not an absolute path", ErrBadState, s.Network.NetworkID)
	}
	return &s, nil
}

// Layout is Kata's runtime directory: /run/vc by default, sandbox states under sbs/ and VM
// sockets under vm/ (kata-containers src/runtime/virtcontainers/persist/fs/fs.go:
// RunStoragePath, RunVMStoragePath). Kata writes persist.json in place (O_TRUNC, then encode),
// not by rename: a reader can see it truncated, and must retry on the next write.
type Layout struct{ Dir string }

// DefaultDir is Kata's runtime directory.
const DefaultDir = "/run/vc"

// SbsDir is where Kata keeps sandbox states.
func (l Layout) SbsDir() string { return filepath.Join(l.Dir, "sbs") }

// VMDir is where Kata keeps per-VM sockets.
func (l Layout) VMDir() string { return filepath.Join(l.Dir, "vm") }

// PersistFile is the sandbox's persisted state.
func (l Layout) PersistFile(id string) string { return filepath.Join(l.SbsDir(), id, "persist.json") }

// QMPSocket is QEMU's monitor, held by Kata's shim for the VM's lifetime.
func (l Layout) QMPSocket(id string) string { return filepath.Join(l.VMDir(), id, "qmp.sock") }

// ExtraMonitor is the second monitor QEMU opens with Kata's extra_monitor_socket = "qmp".
func (l Layout) ExtraMonitor(id string) string {
	return filepath.Join(l.VMDir(), id, "extra-monitor.sock")
}

// Read reads and parses the sandbox's persist.json.
func (l Layout) Read(id string) (*SandboxState, error) {
	b, err := os.ReadFile(l.PersistFile(id))
	if err != nil {
		return nil, fmt.Errorf("read Kata state of %s: %w", id, err)
	}
	s, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("Kata state %s: %w", l.PersistFile(id), err)
	}
	return s, nil
}

// IDs lists the sandbox ids that have a directory under sbs/ (with or without persist.json
// yet: Kata writes it after creating the directory).
func (l Layout) IDs() ([]string, error) {
	ents, err := os.ReadDir(l.SbsDir())
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("list Kata sandboxes: %w", err)
	}
	var ids []string
	for _, e := range ents {
		if e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
			ids = append(ids, e.Name())
		}
	}
	return ids, nil
}

// Present reports whether Kata still has the sandbox: its sbs/<id> directory exists.
func (l Layout) Present(id string) bool {
	_, err := os.Stat(filepath.Join(l.SbsDir(), id))
	return err == nil
}
