package hotplug

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/kata-dp/kata-dp/control/qmp"
)

// pciDevice is the part of a query-pci device we use.
type pciDevice struct {
	Bus    int    `json:"bus"`
	Slot   int    `json:"slot"`
	Func   int    `json:"function"`
	QdevID string `json:"qdev_id"`
	ID     struct {
		Vendor int `json:"vendor"`
		Device int `json:"device"`
	} `json:"id"`
	Bridge *struct {
		Bus struct {
			Secondary int `json:"secondary"`
		} `json:"bus"`
		Devices []pciDevice `json:"devices"`
	} `json:"pci_bridge"`
}

// Bridges kata-dp plugs behind, by vendor:device id (QEMU's own bridges).
const (
	redHat         = 0x1b36
	pciBridgeID    = 0x0001 // pci-bridge: slots 1..31 (hot-plug via SHPC/ACPI)
	pcieRootPortID = 0x000c // pcie-root-port: one device, slot 0 (native PCIe hot-plug)
	intelVendor    = 0x8086
	ioh3420ID      = 0x3420 // ioh3420 root port
)

// slot is a place a device can be hot-plugged: bus is the bridge's qdev id.
type slot struct {
	bus  string
	slot int
}

func queryPCI(ctx context.Context, c *qmp.Client) ([]pciDevice, error) {
	ret, err := c.Execute(ctx, "query-pci", nil)
	if err != nil {
		return nil, err
	}
	var buses []struct {
		Bus     int         `json:"bus"`
		Devices []pciDevice `json:"devices"`
	}
	if err := json.Unmarshal(ret, &buses); err != nil {
		return nil, fmt.Errorf("decode query-pci: %w", err)
	}
	var devs []pciDevice
	for _, b := range buses {
		devs = append(devs, b.Devices...)
	}
	return devs, nil
}

// freeSlot finds the first free hot-pluggable slot: empty root ports first, then free slots
// of pci-bridges, in query-pci order.
func freeSlot(ctx context.Context, c *qmp.Client) (slot, error) {
	devs, err := queryPCI(ctx, c)
	if err != nil {
		return slot{}, fmt.Errorf("find a free slot: %w", err)
	}
	if s, ok := findSlot(devs); ok {
		return s, nil
	}
	return slot{}, ErrNoSlot
}

func findSlot(devs []pciDevice) (slot, bool) {
	var bridges []pciDevice
	var walk func([]pciDevice)
	walk = func(ds []pciDevice) {
		for _, d := range ds {
			if d.Bridge == nil {
				continue
			}
			if d.QdevID != "" {
				bridges = append(bridges, d)
			}
			walk(d.Bridge.Devices)
		}
	}
	walk(devs)
	for _, b := range bridges {
		if isRootPort(b) && len(b.Bridge.Devices) == 0 {
			return slot{bus: b.QdevID, slot: 0}, true
		}
	}
	for _, b := range bridges {
		if b.ID.Vendor != redHat || b.ID.Device != pciBridgeID {
			continue
		}
		used := map[int]bool{}
		for _, d := range b.Bridge.Devices {
			used[d.Slot] = true
		}
		for s := 1; s < 32; s++ {
			if !used[s] {
				return slot{bus: b.QdevID, slot: s}, true
			}
		}
	}
	return slot{}, false
}

func isRootPort(d pciDevice) bool {
	return (d.ID.Vendor == redHat && d.ID.Device == pcieRootPortID) ||
		(d.ID.Vendor == intelVendor && d.ID.Device == ioh3420ID)
}

// pciPath finds the device with the given qdev id and returns its path: the slots of the
// bridges leading to it, each "<slot>.0" on the root bus then "<slot>" behind bridges, then
// the device's own slot, joined with "/", two hex digits each (kata-network's "02.0/00").
func pciPath(devs []pciDevice, id string, prefix []string) (string, bool) {
	for _, d := range devs {
		var here string
		if len(prefix) == 0 {
			here = fmt.Sprintf("%02x.%d", d.Slot, d.Func)
		} else {
			here = fmt.Sprintf("%02x", d.Slot)
		}
		if d.QdevID == id && len(prefix) > 0 {
			return strings.Join(append(prefix, here), "/"), true
		}
		if d.QdevID == id {
			// On the root bus itself: no bridge in front of it.
			return fmt.Sprintf("%02x", d.Slot), true
		}
		if d.Bridge != nil {
			if p, ok := pciPath(d.Bridge.Devices, id, append(prefix[:len(prefix):len(prefix)], here)); ok {
				return p, true
			}
		}
	}
	return "", false
}
