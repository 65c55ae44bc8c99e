package api

import (
	"errors"
	"fmt"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/netspec"
)

// DefaultSocket is where the agent listens unless told otherwise.
const DefaultSocket = "/run/kata-dp/kata-dp.sock"

// SocketEnv names the environment variable that overrides the socket path of clients.
const SocketEnv = "KATA_DP_SOCKET"

// Error kinds carried in the "code" field of error responses.
const (
	CodeInvalid   = "invalid"
	CodeNotFound  = "not-found"  // no such sandbox (or NIC, route)
	CodeAmbiguous = "ambiguous"  // several sandboxes match the prefix
	CodeExists    = "exists"     // already there
	CodeUnhealthy = "unhealthy"  // netns gone, QMP silent
	CodeTooBig    = "too-big"    // network file over 1 MiB
	CodeInternal  = "internal"   // anything else: a step failed
	CodeForbidden = "forbidden"  // peer is not root
	CodeDecode    = "decode"     // the request body is not the JSON expected
	CodeUnknownOp = "unknown-op" // no such kata-network operation
)

// Error is an error response of the agent.
type Error struct {
	Status  int    `json:"-"`
	Message string `json:"error"`
	Code    string `json:"code"`
	// Stdout is what the CLI prints on stdout for this failure ("null\n", the echoed input,
	// or nothing).
	Stdout string `json:"stdout,omitempty"`
}

func (e *Error) Error() string { return e.Message }

// Is maps the error's code back to control's sentinel errors.
func (e *Error) Is(target error) bool {
	switch e.Code {
	case CodeInvalid:
		return target == control.ErrInvalid
	case CodeNotFound:
		return target == control.ErrNoSuchSandbox || target == control.ErrNotFound
	case CodeAmbiguous:
		return target == control.ErrAmbiguous
	case CodeExists:
		return target == control.ErrExists
	case CodeUnhealthy:
		return target == control.ErrUnhealthy
	case CodeTooBig:
		return target == netspec.ErrFileTooBig
	case CodeUnknownOp:
		return target == ErrUnknownOp
	case CodeDecode:
		return target == ErrDecode
	}
	return false
}

// Sentinel errors of the client.
var (
	// ErrUnreachable: the agent's socket could not be reached.
	ErrUnreachable = errors.New("kata-dp agent unreachable")
)

// KataNetworkResult is the success response of a kata-network call.
type KataNetworkResult struct {
	Stdout string `json:"stdout"`
}

// VersionResult is the response of /v1/version.
type VersionResult struct {
	Version string `json:"version"`
}

// classify maps a control error to its code and HTTP status.
func classify(err error) (code string, status int) {
	switch {
	case errors.Is(err, control.ErrNoSuchSandbox), errors.Is(err, control.ErrNotFound):
		return CodeNotFound, 404
	case errors.Is(err, control.ErrAmbiguous):
		return CodeAmbiguous, 409
	case errors.Is(err, control.ErrUnhealthy):
		return CodeUnhealthy, 503
	case errors.Is(err, control.ErrExists):
		return CodeExists, 409
	case errors.Is(err, netspec.ErrFileTooBig):
		return CodeTooBig, 413
	case errors.Is(err, ErrUnknownOp):
		return CodeUnknownOp, 404
	case errors.Is(err, ErrDecode):
		return CodeDecode, 400
	case errors.Is(err, control.ErrInvalid), errors.Is(err, netspec.ErrUpdateFields):
		return CodeInvalid, 400
	}
	return CodeInternal, 500
}

// newError builds the response of a failed call.
func newError(err error, stdout []byte) *Error {
	code, status := classify(err)
	return &Error{Status: status, Message: netspec.Message(err), Code: code, Stdout: string(stdout)}
}

func errorf(status int, code, format string, args ...any) *Error {
	return &Error{Status: status, Code: code, Message: fmt.Sprintf(format, args...)}
}
