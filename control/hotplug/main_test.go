package hotplug

import (
	"os"
	"testing"

	"github.com/kata-dp/kata-dp/control/qmp/qmptest"
)

// TestMain fails the run when descriptors leak: a tap fd QEMU or the fake kept, or a leaked
// connection, shows here.
func TestMain(m *testing.M) { os.Exit(qmptest.RunCheckingFDs(m)) }
