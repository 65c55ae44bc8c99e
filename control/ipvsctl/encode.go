package ipvsctl

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"

	"github.com/kata-dp/kata-dp/control/ipvs"
)

// encodeSnapshot returns json.Marshal(snapshot{Table: t, Seq: seq}), byte for byte, written
// out by hand: encoding/json's reflection took about 10 ms of CPU for a 20000-rule table (the
// save a restore writes beside the dataplane push, which then ran on one CPU instead of two),
// this about 1 ms. The saved files keep their format and are still read with json.Unmarshal;
// TestEncodeSnapshot compares both encodings.
func encodeSnapshot(t *ipvs.Table, seq uint64) ([]byte, error) {
	n := 64
	for _, s := range t.Services {
		n += 128
		if s != nil {
			n += 64 * len(s.Servers)
		}
	}
	b := make([]byte, 0, n)
	b = append(b, `{"services":`...)
	if t.Services == nil {
		b = append(b, "null"...)
	} else {
		b = append(b, '[')
		for i, s := range t.Services {
			if i > 0 {
				b = append(b, ',')
			}
			var err error
			if b, err = appendService(b, s); err != nil {
				return nil, err
			}
		}
		b = append(b, ']')
	}
	c := t.ConnTimeouts
	b = append(b, `,"timeouts":{"tcp":`...)
	b = strconv.AppendUint(b, uint64(c.TCP), 10)
	b = append(b, `,"tcpfin":`...)
	b = strconv.AppendUint(b, uint64(c.TCPFin), 10)
	b = append(b, `,"udp":`...)
	b = strconv.AppendUint(b, uint64(c.UDP), 10)
	b = append(b, `},"lastID":`...)
	b = strconv.AppendUint(b, uint64(t.LastID), 10)
	if seq != 0 {
		b = append(b, `,"journalSeq":`...)
		b = strconv.AppendUint(b, seq, 10)
	}
	return append(b, '}'), nil
}

func appendService(b []byte, s *ipvs.Service) ([]byte, error) {
	if s == nil {
		return append(b, "null"...), nil
	}
	var proto string
	switch s.Proto {
	case ipvs.TCP:
		proto = `"tcp"`
	case ipvs.UDP:
		proto = `"udp"`
	default:
		_, err := s.Proto.MarshalText()
		return nil, fmt.Errorf("json: error calling MarshalText for type ipvs.Proto: %w", err)
	}
	b = append(b, `{"id":`...)
	b = strconv.AppendUint(b, uint64(s.ID), 10)
	b = append(b, `,"proto":`...)
	b = append(b, proto...)
	b = append(b, `,"addr":`...)
	b = appendAddrPort(b, s.Addr)
	b = append(b, `,"scheduler":`...)
	b = appendString(b, s.Scheduler)
	if s.Persistent != 0 {
		b = append(b, `,"persistent":`...)
		b = strconv.AppendUint(b, uint64(s.Persistent), 10)
	}
	b = append(b, `,"netmask":`...)
	b = appendAddr(b, s.Netmask)
	b = append(b, `,"servers":`...)
	if s.Servers == nil {
		return append(b, "null}"...), nil
	}
	b = append(b, '[')
	for i, d := range s.Servers {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, `{"id":`...)
		b = strconv.AppendUint(b, uint64(d.ID), 10)
		b = append(b, `,"addr":`...)
		b = appendAddrPort(b, d.Addr)
		b = append(b, `,"weight":`...)
		b = strconv.AppendInt(b, int64(d.Weight), 10)
		b = append(b, '}')
	}
	return append(b, "]}"...), nil
}

// appendAddr and appendAddrPort append an address's text (netip's AppendText, which never
// fails and writes nothing for the zero value) as a JSON string.
func appendAddr(b []byte, a netip.Addr) []byte {
	b = append(b, '"')
	n := len(b)
	b, _ = a.AppendText(b)
	return closeString(b, n)
}

func appendAddrPort(b []byte, a netip.AddrPort) []byte {
	b = append(b, '"')
	n := len(b)
	b, _ = a.AppendText(b)
	return closeString(b, n)
}

// closeString ends the JSON string whose text starts at b[n:], escaping it as appendString
// does when it has to (only an IPv6 zone can make an address need it).
func closeString(b []byte, n int) []byte {
	if !plain(b[n:]) {
		return appendString(b[:n-1], string(b[n:]))
	}
	return append(b, '"')
}

// plain reports whether s is written into a JSON string as it is.
func plain[S string | []byte](s S) bool {
	for i := range len(s) {
		if c := s[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			return false
		}
	}
	return true
}

// appendString appends s as encoding/json writes a string: as it is when no byte needs
// escaping (the addresses, protocols and scheduler names of a table), else through
// encoding/json itself, so its escaping (HTML characters included) is kept exactly.
func appendString(b []byte, s string) []byte {
	if !plain(s) {
		q, _ := json.Marshal(s) // a string always encodes
		return append(b, q...)
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}
