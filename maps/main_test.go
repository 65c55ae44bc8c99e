package maps

import (
	"os"
	"testing"

	"github.com/kata-dp/kata-dp/control/qmp/qmptest"
)

// A leaked map fd keeps a map alive; the run fails on it.
func TestMain(m *testing.M) { os.Exit(qmptest.RunCheckingFDs(m)) }
