// Package deploy holds what installs and runs kata-dp on a node: the systemd unit
// (systemd/kata-dp.service), the default config file and the Kubernetes manifests
// (kubernetes/). Its tests check them against the code: `make install` into a temporary
// DESTDIR, `systemd-analyze verify` on the installed unit, and a strict decode of every
// manifest. It has no Go API.
package deploy
