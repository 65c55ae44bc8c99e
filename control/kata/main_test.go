package kata_test

import (
	"os"
	"testing"

	"github.com/kata-dp/kata-dp/control/qmp/qmptest"
)

// TestMain fails the run when descriptors leak (a pidfd, a netns handle, a link).
func TestMain(m *testing.M) { os.Exit(qmptest.RunCheckingFDs(m)) }
