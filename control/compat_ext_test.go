package control_test

import (
	"context"

	"github.com/kata-dp/kata-dp/control"
)

// kataNetwork runs a kata-network operation the way the agent's API does.
func kataNetwork(ctx context.Context, c *control.Controller, id, op string) ([]byte, error) {
	return c.KataNetwork(ctx, id, op, nil)
}
