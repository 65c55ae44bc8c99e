package qmp_test

import (
	"os"
	"testing"

	"github.com/kata-dp/kata-dp/control/qmp/qmptest"
)

// TestMain fails the run when descriptors leak: a leaked connection or passed fd shows here.
func TestMain(m *testing.M) { os.Exit(qmptest.RunCheckingFDs(m)) }
