# Per-round ratios of a kata-dp bench JSON (the modes of a round ran back to back), median [min..max] over the rounds:
# python3 ratios.py session11.json > session11-ratios.txt
import json, sys, statistics as st
d = json.load(open(sys.argv[1]))
by = {}
for s in d['samples']:
    by.setdefault(s['round'], {})[(s['mode'], s['case'])] = s
flag = sum(1 for s in d['samples'] if s.get('flags'))
print(f"{len(d['samples'])} samples, {flag} flagged; command: {d['command']}")
pairs = []
for case in ['h2g-64', 'g2h-64']:
    for a, b in [('tc','macvtap'),('macvtap-bpf','macvtap'),('ref-macvtap-pass','macvtap'),('ref-redirect','macvtap'),('tc','tcfilter'),('xdp','tc'),('macvtap-bpf','tc'),('xdp','macvtap')]:
        pairs.append((a, case, b, case))
for case in ['h2g-64', 'g2h-64']:
    pairs.append(('tc+svc5000', case, 'tc', case))
    v = case.replace('-64', '-vip-64')
    pairs.append(('tc+svc5000', v, 'tc', case))
def fmt(xs, f):
    return f"{f(st.median(xs))} [{f(min(xs))}..{f(max(xs))}]"
for a, ca, b, cb in pairs:
    pps, fwd, diff, cpu = [], [], [], []
    for r, ms in by.items():
        if (a, ca) not in ms or (b, cb) not in ms: continue
        x, y = ms[(a, ca)]['values'], ms[(b, cb)]['values']
        pps.append(x['pps'] / y['pps'])
        if x.get('fwd_ns') and y.get('fwd_ns') and y['fwd_ns'] > 0: fwd.append(x['fwd_ns'] / y['fwd_ns'])
        diff.append(x['cpu_ns'] - y['cpu_ns'])
        cpu.append(x['cpu_ns'] / y['cpu_ns'])
    if not pps: continue
    r2 = lambda v: f"{v:.2f}"; ns = lambda v: f"{v:+.0f}"
    print(f"{ca} {a} vs {cb} {b}: pps {fmt(pps, r2)} fwd {fmt(fwd, r2) if fwd else '-'} fwd diff ns {fmt(diff, ns)} sender cpu ratio {fmt(cpu, r2)} n={len(pps)}")
