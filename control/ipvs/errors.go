package ipvs

import (
	"errors"
	"fmt"
	"strconv"
)

// Exit statuses ipvsadm 1.31 uses for its failures.
const (
	// ExitUsage is ipvsadm's status for argument errors (fail(2, ...)).
	ExitUsage = 2
	// ExitFailed is ipvsadm's status when the kernel refuses a command
	// (process_options returns -1).
	ExitFailed = 255
)

// Errors a command can fail with. Every *Error wraps exactly one of them, so
// callers test with errors.Is; the text of the semantic ones is ipvsadm's
// own (libipvs ipvs_strerror), which is what a user of ipvsadm expects.
var (
	// ErrUsage: the arguments are malformed (ipvsadm exits 2).
	ErrUsage = errors.New("usage error")
	// ErrServiceExists: --add-service of a service that is already there.
	ErrServiceExists = errors.New("Service already exists")
	// ErrNoService: --edit-service, --delete-service or --list of a missing service.
	ErrNoService = errors.New("No such service")
	// ErrServiceNotDefined: a real-server command names a missing service.
	ErrServiceNotDefined = errors.New("Service not defined")
	// ErrDestExists: --add-server of a real server the service already has.
	ErrDestExists = errors.New("Destination already exists")
	// ErrNoDest: --edit-server or --delete-server of a missing real server.
	ErrNoDest = errors.New("No such destination")
	// ErrSchedulerNotFound: the scheduler is not one of the ten supported.
	ErrSchedulerNotFound = errors.New("Scheduler or persistence engine not found")
	// ErrInvalid: the kernel's EINVAL, e.g. a real server that is not unicast.
	ErrInvalid = errors.New("Invalid operation.  Possibly wrong module version, address not unicast, ...")
	// ErrRuleLimit: the command would take the table past MaxRules.
	ErrRuleLimit = fmt.Errorf("too many rules: a sandbox holds at most %d (services and real servers)", MaxRules)
	// ErrNotEmpty: a restore into a table that already holds rules.
	ErrNotEmpty = errors.New("restore needs an empty table: clear the rules first")
	// ErrEmptyRestore: a restore input without any rule.
	ErrEmptyRestore = errors.New("restore input holds no rule")
	// ErrNotInRestore: a restore line with a command that does not change rules.
	ErrNotInRestore = errors.New("command not allowed in a restore file")
	// ErrIDSpace: the table ran out of ids (MaxID, after a billion creations).
	ErrIDSpace = errors.New("rule id space exhausted")
)

// Error is the error of every parser and table operation. Msg is ipvsadm's
// message where ipvsadm has one, Token the offending token (never empty for
// a parse error), Line the 1-based line of a restore input (0 otherwise) and
// Code the exit status ipvsadm 1.31 would end with.
type Error struct {
	Kind  error
	Msg   string
	Token string
	Line  int
	Code  int
}

func (e *Error) Error() string {
	s := e.Msg
	if e.Token != "" {
		s += ": " + strconv.Quote(e.Token)
	}
	if e.Line > 0 {
		s = "line " + strconv.Itoa(e.Line) + ": " + s
	}
	return s
}

// Unwrap returns the sentinel error classifying e.
func (e *Error) Unwrap() error { return e.Kind }

// usageErr builds an argument error (exit 2) with ipvsadm's message.
func usageErr(token, format string, args ...any) *Error {
	return &Error{Kind: ErrUsage, Msg: fmt.Sprintf(format, args...), Token: token, Code: ExitUsage}
}

// failErr builds a semantic error (exit 255) from one of the sentinels.
func failErr(kind error, token string) *Error {
	return &Error{Kind: kind, Msg: kind.Error(), Token: token, Code: ExitFailed}
}

// atLine returns err with the restore line number set, if it is an *Error.
func atLine(err error, line int) error {
	var e *Error
	if errors.As(err, &e) {
		c := *e
		c.Line = line
		return &c
	}
	return fmt.Errorf("line %d: %w", line, err)
}
