package loader_test

import (
	"os"
	"testing"

	"github.com/kata-dp/kata-dp/control/qmp/qmptest"
)

// A leaked fd is a program, map or link kept alive after its test: a leaked link fd is a
// program left attached. The run fails on it.
func TestMain(m *testing.M) { os.Exit(qmptest.RunCheckingFDs(m)) }
