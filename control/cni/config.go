package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/api"
	"github.com/kata-dp/kata-dp/control/dataplane"
	"github.com/kata-dp/kata-dp/control/netspec"
)

// Defaults of the configuration keys.
const (
	// TapNamePrefix starts the tap name derived for a container when tapName is not set
	// (see TapNameFor).
	TapNamePrefix = "kdp"
	// DefaultStateDir holds the plugin's records, beside host-local's /var/lib/cni/networks.
	DefaultStateDir = "/var/lib/cni/kata-dp"
)

// Config is the kata-dp-cni entry of a network configuration list.
type Config struct {
	types.PluginConf

	// Socket is the agent's API socket (default api.DefaultSocket).
	Socket string `json:"socket,omitempty"`
	// Mode is the dataplane mode of a sandbox the plugin registers: tc, xdp or tcfilter
	// (default: the agent's, tc; macvtap is refused, see errMacvtap). A sandbox the runtime
	// registered keeps its own.
	Mode string `json:"mode,omitempty"`
	// AntiSpoof and StrictEgress switch the datapath's checks of a sandbox the plugin
	// registers; nil leaves the agent's default (on).
	AntiSpoof    *bool `json:"antiSpoof,omitempty"`
	StrictEgress *bool `json:"strictEgress,omitempty"`
	// TapName is the tap the agent creates in the container netns. Empty (the default) means
	// one per container, TapNameFor(CNI_CONTAINERID): the agent reserves tap names host-wide,
	// so a fixed name serves one container per node.
	TapName string `json:"tapName,omitempty"`
	// StateDir holds the plugin's records of what ADD made (default DefaultStateDir).
	StateDir string `json:"stateDir,omitempty"`
}

// errMacvtap explains why the plugin does not offer Kata's macvtap model: there the VM opens a
// macvtap device the agent does not report (not the tap), and the veth's MAC is swapped, which
// breaks the previous plugin's CHECK of the container interface.
var errMacvtap = errors.New("mode \"macvtap\" is not supported by kata-dp-cni, nor \"macvtap-bpf\" (the VM would use a macvtap device instead of the tap, and the container interface's MAC would change under the previous plugin); use tc, xdp or tcfilter")

// The CNI spec versions the plugin speaks: chaining needs prevResult (0.3.0 and later), GC
// and STATUS are 1.1.
var supported = []string{"1.0.0", "1.1.0"}

// VersionInfo is what VERSION reports.
func VersionInfo() version.PluginInfo { return version.PluginSupports(supported...) }

// networkNameRE is the spec's rule for network names; they also name state files.
var networkNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)

// ParseConfig decodes and validates the plugin's configuration from stdin data and fills in the
// defaults. A previous result, when present, is parsed into PrevResult. Every failure is a
// *types.Error with code 7 (invalid network configuration) or 1 (incompatible version).
func ParseConfig(stdin []byte) (*Config, error) {
	c := &Config{}
	if err := json.Unmarshal(stdin, c); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "kata-dp-cni: decode network configuration", err.Error())
	}
	if !slices.Contains(supported, c.CNIVersion) {
		return nil, types.NewError(types.ErrIncompatibleCNIVersion, "kata-dp-cni: unsupported cniVersion",
			fmt.Sprintf("cniVersion %q; supported: %s", c.CNIVersion, strings.Join(supported, ", ")))
	}
	if err := c.validate(); err != nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "kata-dp-cni: invalid network configuration", err.Error())
	}
	if err := version.ParsePrevResult(&c.PluginConf); err != nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "kata-dp-cni: invalid prevResult", err.Error())
	}
	return c, nil
}

// validate checks the keys and fills in the defaults.
func (c *Config) validate() error {
	if !networkNameRE.MatchString(c.Name) {
		return fmt.Errorf("network name %q must start with a letter or digit followed by letters, digits, '_', '.', '-'", c.Name)
	}
	c.Socket = api.SocketPath(c.Socket)
	if !filepath.IsAbs(c.Socket) {
		return fmt.Errorf("socket %q is not an absolute path", c.Socket)
	}
	if modes := dataplane.Modes(); c.Mode != "" && !slices.Contains(modes, c.Mode) {
		return fmt.Errorf("mode %q is not one of %s", c.Mode, strings.Join(modes, ", "))
	}
	if c.Mode == control.ModeMacvtap || c.Mode == control.ModeMacvtapBPF {
		return errMacvtap
	}
	if c.TapName != "" {
		if err := netspec.ValidName("tapName", c.TapName); err != nil {
			return err
		}
	}
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	if !filepath.IsAbs(c.StateDir) {
		return fmt.Errorf("stateDir %q is not an absolute path", c.StateDir)
	}
	return nil
}

// tapIDLen is how much of the container id a derived tap name keeps: TapNamePrefix plus 12
// characters is the 15 a Linux interface name may have, and 12 is the short id runtimes show.
const tapIDLen = netspec.MaxNameLen - len(TapNamePrefix)

// TapNameFor returns the tap name the plugin uses for container id when tapName is not set:
// TapNamePrefix followed by the first 12 characters of id (all of a shorter id), each outside
// [A-Za-z0-9_.-] replaced by '-'. It starts with a letter and fits an interface name. Two
// containers get the same name only when their ids share the first 12 characters.
func TapNameFor(id string) string {
	b := []byte(id)
	if len(b) > tapIDLen {
		b = b[:tapIDLen]
	}
	for i, c := range b {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '.' || c == '-') {
			b[i] = '-'
		}
	}
	return TapNamePrefix + string(b)
}

// tapFor returns the tap name of an attachment of container id: tapName, or TapNameFor(id).
// Only ADD uses it: the other commands take the tap ADD used from its record.
func (c *Config) tapFor(id string) string {
	if c.TapName != "" {
		return c.TapName
	}
	return TapNameFor(id)
}

// prevResult returns the previous result as a 1.0 result, or an error when there is none: the
// plugin only works in a chain.
func (c *Config) prevResult() (*current.Result, error) {
	if c.PrevResult == nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "kata-dp-cni: no prevResult",
			"kata-dp-cni is a chained plugin: put it after the plugin that creates the container interface (bridge, ptp, ...)")
	}
	r, err := current.NewResultFromResult(c.PrevResult)
	if err != nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "kata-dp-cni: invalid prevResult", err.Error())
	}
	return r, nil
}

// parseForDel decodes the configuration for DEL and GC, which must not hold up the rest of a
// chain over keys they do not use (mode, tapName, socket: DEL takes the socket from the record
// ADD wrote). ok is false when the network name or stateDir is unusable: ADD cannot have
// recorded anything under such a configuration, so there is nothing to release.
func parseForDel(stdin []byte) (c *Config, ok bool, err error) {
	var keys struct {
		Name     string `json:"name"`
		StateDir string `json:"stateDir"`
		Socket   string `json:"socket"`
	}
	if err := json.Unmarshal(stdin, &keys); err != nil {
		return nil, false, types.NewError(types.ErrDecodingFailure, "kata-dp-cni: decode network configuration", err.Error())
	}
	c = &Config{StateDir: keys.StateDir, Socket: keys.Socket}
	c.Name = keys.Name
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	c.Socket = api.SocketPath(c.Socket)
	if !networkNameRE.MatchString(c.Name) || !filepath.IsAbs(c.StateDir) {
		return c, false, nil
	}
	return c, true, nil
}
