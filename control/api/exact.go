package api

import "context"

// KataNetworkExact is KataNetwork with the sandbox id matched exactly, never as a prefix
// (the kata-network contract's prefixes are for people at a shell): the CNI plugin names
// containers by their full id and must never touch another container whose id merely starts
// with it, e.g. when its own sandbox was removed a moment ago.
func (c *Client) KataNetworkExact(ctx context.Context, id, op string, input []byte) ([]byte, error) {
	return c.kataNetwork(ctx, id, op, "?exact=1", input)
}
