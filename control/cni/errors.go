package cni

import (
	"errors"
	"fmt"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/kata-dp/kata-dp/control/api"
)

// The plugin's own error codes (the CNI spec leaves 100 and above to plugins).
const (
	// CodeAgentUnreachable: the agent's socket does not answer; nothing was changed.
	CodeAgentUnreachable uint = 100
	// CodeAgentFailed: the agent refused or failed an operation (it rolled back its part).
	CodeAgentFailed uint = 101
	// CodeNoInterface: the container interface is missing from prevResult or the netns, or is
	// not usable as an uplink.
	CodeNoInterface uint = 102
	// CodeCheckFailed: CHECK found the attachment not as ADD left it.
	CodeCheckFailed uint = 103
	// CodeConflict: something ADD would make is already there (the tap, the attachment, a
	// sandbox of that id in another netns).
	CodeConflict uint = 104
)

// agentError turns an error of the agent's client into a CNI error: unreachable agents get
// CodeAgentUnreachable with a hint, everything else CodeAgentFailed with the agent's message.
func agentError(what string, err error) *types.Error {
	if errors.Is(err, api.ErrUnreachable) {
		return types.NewError(CodeAgentUnreachable, "kata-dp-cni: kata-dp agent unreachable",
			fmt.Sprintf("%s: %v (is `kata-dp agent` running, and is \"socket\" in the network configuration its --socket?)", what, err))
	}
	return types.NewError(CodeAgentFailed, "kata-dp-cni: "+what+" failed", err.Error())
}
