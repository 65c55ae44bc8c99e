// Package headstart sends the rules of `kata-dp kata-ipvs ipvsadm --restore - ID` to the agent
// while the client process is still initialising its packages, so that the agent parses,
// validates, pushes and saves them during the client's own start instead of after it.
//
// Why: the client is a process of the agent's 33 MB binary, and the initialisation of the
// packages it links (the Kubernetes client, prometheus, protobuf, ...) takes 15-20 ms between
// this package's init (about 4 ms after the exec) and main. A 20000-rule restore then waits
// another 25-30 ms for the upload and the agent's work (docs/performance.md, "The restore's
// timeline"). Started here, the two overlap: main finds the agent's answer on its way or
// already in the socket's buffer.
//
// The package imports nothing but syscall, sync and internal/procself (syscall only), so that
// it is initialised before every package whose start it overlaps (Go initialises the packages
// whose imports are done in the order of their import paths; this one comes right after the
// standard library's first packages). It speaks just enough HTTP/1.1 to send one request (the
// agent's restore-rules call, as control/api's client sends it: the length of a regular file,
// else chunked, and `Expect: 100-continue` so that an older agent without the call answers 404
// before any rule is read) and leaves the answer, unread, to control/api
// (Client.FinishRestore), which reads it with net/http once main runs.
//
// It starts only for a command line it reads exactly as the command does: `kata-ipvs`, then
// `ipvsadm`, `--restore -` (or `--restore=-`), at most one `--socket PATH` (or `--socket=PATH`)
// and one container id of the characters a URL path keeps as they are, in any order. Anything
// else (--timeout, --help, an unusual id) leaves the restore to main, as does an agent that
// cannot be reached or closes the connection before the rules are read: whatever the upload
// could not do, nothing of standard input was read and main does it the ordinary way.
package headstart

import (
	"sync"
	"syscall"

	"github.com/kata-dp/kata-dp/internal/procself"
)

// What Upload knows of the command line and of the agent, duplicated here because the
// packages that own them (control/api) are initialised after this one; control/api's tests
// check that they agree.
const (
	// DefaultSocket is api.DefaultSocket, SocketEnv api.SocketEnv.
	DefaultSocket = "/run/kata-dp/kata-dp.sock"
	SocketEnv     = "KATA_DP_SOCKET"
	// MaxSize is api.MaxRestoreSize: past it the upload stops with ErrTooBig.
	MaxSize = 8 << 20
)

// Upload is a restore's request sent by this package. Its fields are set once Done is closed.
type Upload struct {
	// Socket and ID are the agent's socket and the container id the command line names.
	Socket, ID string

	done chan struct{}

	mu      sync.Mutex // guards fd and aborted: Abort runs beside the upload
	fd      int        // the connection, -1 once closed (Declined)
	aborted bool

	// Declined: nothing was read from standard input and the connection is closed (the agent
	// could not be reached, or went away before it asked for the rules); main does the restore.
	Declined bool
	// Early: the agent answered before it asked for the rules (an older agent's 404); Head
	// holds what was read of that answer, and nothing of standard input was read.
	Early bool
	// Head is what was read from the connection beyond the 100 Continue (or the early answer):
	// the start of the answer that follows it.
	Head []byte
	// Sent counts the bytes of rules read and sent.
	Sent int64
	// ReadErr is the error reading the rules failed with, or ErrTooBig. The request was then
	// cut off (the agent restores nothing of a body it did not get whole).
	ReadErr error
	// SendErr is the error sending the rules failed with (the agent closed the connection:
	// its answer, an error, may still be read).
	SendErr error
}

// Done is closed when the upload has ended, one way or another.
func (u *Upload) Done() <-chan struct{} { return u.done }

// Fd returns the connection to the agent, after Done: the answer is to be read from it. The
// caller owns it. -1 when Declined.
func (u *Upload) Fd() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.fd
}

// Abort shuts the connection down (a caller that gives up waiting): an upload blocked on the
// agent ends (one blocked reading its input does not: the process is about to exit).
func (u *Upload) Abort() {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.aborted = true
	if u.fd >= 0 {
		syscall.Shutdown(u.fd, syscall.SHUT_RDWR)
	}
}

// ErrTooBig is the upload's ReadErr for rules of more than MaxSize bytes.
var ErrTooBig = errorString("rules file too big")

type errorString string

func (e errorString) Error() string { return string(e) }

// ErrShrank is the upload's ReadErr for a regular file that ended before the length it had
// when the request announced it.
var ErrShrank = errorString("the rules file ended before its announced length")

var started *Upload

// Restore returns the upload this process started at its initialisation, or nil if it
// started none. It hands it out once: a second call returns nil.
func Restore() *Upload {
	u := started
	started = nil
	return u
}

func init() {
	var buf [4096]byte
	args := splitArgs(buf[:procself.ReadFile("/proc/self/cmdline", buf[:])])
	if len(args) < 2 {
		return
	}
	sock, id, ok := restoreArgs(args[1:])
	if !ok {
		return
	}
	if sock == "" {
		sock, _ = syscall.Getenv(SocketEnv)
	}
	if sock == "" {
		sock = DefaultSocket
	}
	started = Start(sock, id, 0)
}

// restoreArgs reports whether args (the command line after the program's name) is a restore
// this package runs, and its --socket (empty when not given) and container id.
func restoreArgs(args []string) (sock, id string, ok bool) {
	if len(args) == 0 || args[0] != "kata-ipvs" {
		return "", "", false
	}
	var op, restore bool
	var sockSet bool
	for i := 1; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--restore" && i+1 < len(args) && args[i+1] == "-" && !restore:
			restore = true
			i++
		case a == "--restore=-" && !restore:
			restore = true
		case a == "--socket" && i+1 < len(args) && !sockSet && plainValue(args[i+1]):
			sock, sockSet = args[i+1], true
			i++
		case len(a) >= 9 && a[:9] == "--socket=" && !sockSet && plainValue(a[9:]):
			sock, sockSet = a[9:], true
		case a == "ipvsadm" && !op:
			op = true
		case op && id == "" && plainID(a):
			id = a
		default:
			return "", "", false
		}
	}
	return sock, id, op && restore && id != ""
}

// plainValue reports whether a flag's value is one pflag takes as this package does.
func plainValue(v string) bool { return v != "" && v[0] != '-' }

// plainID reports whether id is a container id made of characters that url.PathEscape leaves
// as they are, and that pflag reads as an argument (not a flag).
func plainID(id string) bool {
	if id == "" || id[0] == '-' || len(id) > 256 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_' || c == '.' || c == '~') {
			return false
		}
	}
	return id != "." && id != ".."
}

// Start sends the rules read from file descriptor in to the agent at sock as the restore of
// container id, on a goroutine of its own, and returns at once. (init calls it with standard
// input; tests with files and pipes.)
func Start(sock, id string, in int) *Upload {
	u := &Upload{Socket: sock, ID: id, done: make(chan struct{}), fd: -1}
	go func() {
		defer close(u.done)
		u.run(in)
	}()
	return u
}

func (u *Upload) run(in int) {
	// The length of a regular file, from where it stands; -1: sent chunked.
	size := int64(-1)
	var st syscall.Stat_t
	if syscall.Fstat(in, &st) == nil && st.Mode&syscall.S_IFMT == syscall.S_IFREG {
		if off, err := syscall.Seek(in, 0, 1); err == nil && st.Size >= off {
			size = st.Size - off
		}
	}
	if size > MaxSize {
		u.Declined = true // main reports it, as it always has, without a call
		return
	}
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		u.Declined = true
		return
	}
	if err := syscall.Connect(fd, &syscall.SockaddrUnix{Name: u.Socket}); err != nil {
		syscall.Close(fd)
		u.Declined = true
		return
	}
	u.mu.Lock()
	u.fd = fd
	aborted := u.aborted
	u.mu.Unlock()
	if aborted {
		u.decline()
		return
	}
	head := "POST /v1/sandboxes/" + u.ID + "/kata-ipvs/restore-rules HTTP/1.1\r\nHost: kata-dp\r\nUser-Agent: kata-dp\r\n"
	if size >= 0 {
		head += "Content-Length: " + decimal(size) + "\r\n"
	} else {
		head += "Transfer-Encoding: chunked\r\n"
	}
	head += "Content-Type: text/plain\r\nExpect: 100-continue\r\n\r\n"
	if send(fd, []byte(head)) != nil {
		u.decline()
		return
	}
	// The agent's first answer: 100 Continue, or a final answer (an older agent's 404).
	var ans []byte
	for {
		var b [512]byte
		n, err := syscall.Read(fd, b[:])
		if err == syscall.EINTR {
			continue
		}
		if err != nil || n <= 0 {
			u.decline()
			return
		}
		ans = append(ans, b[:n]...)
		if end := headerEnd(ans); end >= 0 {
			if !continued(ans) {
				u.Early, u.Head = true, ans
				return
			}
			u.Head = ans[end:]
			break
		}
		if len(ans) > 64<<10 {
			u.decline()
			return
		}
	}
	u.body(fd, in, size)
}

// decline closes the connection of an upload that read nothing of standard input.
func (u *Upload) decline() {
	u.mu.Lock()
	defer u.mu.Unlock()
	syscall.Close(u.fd)
	u.fd, u.Declined = -1, true
}

// body reads the rules from in and sends them: size bytes, or chunked when size < 0.
func (u *Upload) body(fd, in int, size int64) {
	const room = 10 // a chunk's "%x\r\n" before the data
	buf := make([]byte, room+256<<10+7)
	for {
		want := len(buf) - room - 7
		if size >= 0 {
			want = int(min(int64(want), size-u.Sent))
			if want == 0 {
				return
			}
		}
		n, err := syscall.Read(in, buf[room:room+want])
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			u.cut(fd, err)
			return
		}
		if n == 0 {
			if size >= 0 {
				u.cut(fd, ErrShrank)
				return
			}
			u.SendErr = send(fd, []byte("0\r\n\r\n"))
			return
		}
		if u.Sent += int64(n); u.Sent > MaxSize {
			u.cut(fd, ErrTooBig)
			return
		}
		out := buf[room : room+n]
		if size < 0 {
			h := hex(n) + "\r\n"
			start := room - len(h)
			copy(buf[start:], h)
			buf[room+n], buf[room+n+1] = '\r', '\n'
			out = buf[start : room+n+2]
		}
		if err := send(fd, out); err != nil {
			u.SendErr = err
			return
		}
	}
}

// cut ends a request whose rules could not be read whole: the connection is shut for writing
// without the body's end, so the agent sees a truncated request and restores nothing.
func (u *Upload) cut(fd int, err error) {
	u.ReadErr = err
	syscall.Shutdown(fd, syscall.SHUT_WR)
}

// send writes all of b, without SIGPIPE when the agent has gone.
func send(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := syscall.SendmsgN(fd, b, nil, nil, syscall.MSG_NOSIGNAL)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

// headerEnd returns where the header block of an HTTP answer at the start of b ends (after
// its empty line), or -1 if b does not hold all of it yet.
func headerEnd(b []byte) int {
	for i := 0; i+3 < len(b); i++ {
		if b[i] == '\r' && b[i+1] == '\n' && b[i+2] == '\r' && b[i+3] == '\n' {
			return i + 4
		}
	}
	return -1
}

// continued reports whether the answer starting b is a 100 Continue.
func continued(b []byte) bool {
	const p = "HTTP/1.1 100 "
	return len(b) >= len(p) && string(b[:len(p)]) == p
}

func decimal(n int64) string {
	if n == 0 {
		return "0"
	}
	var b [20]byte
	i := len(b)
	for ; n > 0; n /= 10 {
		i--
		b[i] = byte('0' + n%10)
	}
	return string(b[i:])
}

func hex(n int) string {
	const digits = "0123456789abcdef"
	if n == 0 {
		return "0"
	}
	var b [16]byte
	i := len(b)
	for ; n > 0; n >>= 4 {
		i--
		b[i] = digits[n&15]
	}
	return string(b[i:])
}

// splitArgs splits a command line as /proc/<pid>/cmdline has it (arguments ended by NUL
// bytes). A line longer than the buffer read (its last argument cut) gives no arguments.
func splitArgs(b []byte) []string {
	if len(b) == 0 || b[len(b)-1] != 0 {
		return nil
	}
	var args []string
	start := 0
	for i, c := range b {
		if c == 0 {
			args = append(args, string(b[start:i]))
			start = i + 1
		}
	}
	return args
}
