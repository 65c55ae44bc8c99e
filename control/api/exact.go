package api

import (
	"context"
	"errors"
	"net/url"

	"github.com/kata-dp/kata-dp/control/netspec"
)

// KataNetworkExact is KataNetwork with the sandbox id matched exactly, never as a prefix
// (the kata-network contract's prefixes are for people at a shell): the CNI plugin names
// containers by their full id and must never touch another container whose id merely starts
// with it, e.g. when its own sandbox was removed a moment ago.
func (c *Client) KataNetworkExact(ctx context.Context, id, op string, input []byte) ([]byte, error) {
	if input == nil {
		input = []byte{}
	}
	var res KataNetworkResult
	err := c.Do(ctx, "POST", "/v1/sandboxes/"+url.PathEscape(id)+"/kata-network/"+url.PathEscape(op)+"?exact=1", input, &res)
	if err != nil {
		var e *Error
		if errors.As(err, &e) {
			return []byte(e.Stdout), err
		}
		if errors.Is(err, ErrUnreachable) {
			return netspec.Null, err
		}
		return nil, err
	}
	return []byte(res.Stdout), nil
}
