package qmptest_test

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/kata-dp/kata-dp/control/qmp"
	"github.com/kata-dp/kata-dp/control/qmp/qmptest"
)

func TestNilHandlerAndRawProtocol(t *testing.T) {
	srv := qmptest.Serve(t, nil)
	c, err := net.Dial("unix", srv.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	dec := json.NewDecoder(c)
	var m map[string]json.RawMessage
	if err := dec.Decode(&m); err != nil || m["QMP"] == nil {
		t.Fatalf("greeting: %v %v", m, err)
	}
	// Commands before negotiation are refused, as QEMU does.
	c.Write([]byte(`{"execute":"query-status","id":1}`))
	m = nil
	dec.Decode(&m)
	if string(m["id"]) != "1" || m["error"] == nil {
		t.Errorf("before negotiation: %v", m)
	}
	c.Write([]byte(`{"execute":"qmp_capabilities"}{"execute":"query-status","id":"x"}`))
	var replies []string
	for range 2 {
		var r json.RawMessage
		dec.Decode(&r)
		replies = append(replies, string(r))
	}
	want := []string{`{"return":{}}`, `{"error":{"class":"CommandNotFound","desc":"The command query-status has not been found"},"id":"x"}`}
	if diff := cmp.Diff(want, replies); diff != "" {
		t.Errorf("replies (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"query-status"}, srv.Commands()); diff != "" {
		t.Errorf("commands (-want +got):\n%s", diff)
	}
}

func TestHandleAndEmit(t *testing.T) {
	srv := qmptest.Serve(t, nil)
	srv.Handle(func(cmd string, args json.RawMessage, fds []int) (any, *qmp.Error) {
		srv.Emit("STOP", nil)
		return []int{1, 2}, nil
	})
	c := qmp.New(srv.Path())
	defer c.Close()
	sub := c.Subscribe("STOP")
	defer sub.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ret, err := c.Execute(ctx, "stop", nil)
	if err != nil || string(ret) != "[1,2]" {
		t.Fatalf("stop: %s %v", ret, err)
	}
	if ev, err := sub.Next(ctx); err != nil || ev.Name != "STOP" {
		t.Errorf("event: %v %v", ev, err)
	}
	srv.Close()
	if _, err := c.Execute(ctx, "stop", nil); !errors.Is(err, qmp.ErrDisconnected) && !errors.Is(err, qmp.ErrUnavailable) {
		t.Errorf("after close: %v", err)
	}
}
