// Package deploy holds what installs and runs kata-dp on a node: the systemd unit
// (systemd/kata-dp.service), the default config file, the Kubernetes manifests (kubernetes/),
// the Grafana dashboard (grafana/) and the Prometheus alert rules (prometheus/). Its tests
// check them against the code: `make install` into a temporary DESTDIR, `systemd-analyze
// verify` on the installed unit, a strict decode of every manifest, `promtool check rules` and
// `promtool test rules` on the alerts, and every metric the dashboard and the alerts query
// against docs/metrics.md. It has no Go API.
package deploy
