# Summarises tlb-*.json into tlb-sweep.txt: python3 tlb-sweep.py tlb-h2g-b*-r*.json; python3 tlb-sweep.py tlb-g2h.json
import json,sys,statistics as st,glob,re
# usage: an.py files... ; groups by batch from the command
rows={}
for f in sys.argv[1:]:
    d=json.load(open(f))
    m=re.search(r'--batch (\d+)',d['command']); b=int(m.group(1)) if m else 64
    for s in d['samples']:
        key=(s['case'],b)
        rows.setdefault(key,{}).setdefault(s['mode'],[]).append((s['values'].get('cpu_ns'),s['values'].get('pps'),bool(s.get('flags')),s['values'].get('other_cpu')))
for (case,b),modes in sorted(rows.items()):
    allsamp=sum(len(v) for v in modes.values()); fl=sum(x[2] for v in modes.values() for x in v)
    def med(vs,good=True):
        u=[x for x in vs if not x[2]] if good else vs
        if not u: u=vs
        return st.median([x[0] for x in u]), st.median([x[1] for x in u]), min(x[0] for x in u), max(x[0] for x in u), len(u)
    base=med(modes['ref-drop'])[0]
    mv=med(modes['macvtap'])
    print(f"== {case} batch {b}: {allsamp} samples, {fl} flagged; ref-drop sender {base:.0f} ns")
    for mode,v in modes.items():
        c,p,lo,hi,n=med(v)
        f=c-base; fm=mv[0]-base
        print(f"  {mode:18s} sender {c:6.0f} [{lo:.0f}..{hi:.0f}] fwd {f:5.0f}  xMVT {f/fm if fm else 0:5.2f}  fwd-macvtap {f-fm:+5.0f}  pps {p/1e3:5.0f}k xMVT {p/mv[1]:.2f} n={n}")
# per-round gaps: sender(mode) - sender(macvtap) within the same file and round, median [min..max] over all pairs (flagged included, count flagged)
print("\nper-round sender CPU difference to macvtap (= forward CPU difference), all pairs:")
gaps={}
for f in sys.argv[1:]:
    d=json.load(open(f))
    m=re.search(r'--batch (\d+)',d['command']); b=int(m.group(1)) if m else 64
    by={}
    for s in d['samples']:
        by.setdefault((s['case'],s['round']),{})[s['mode']]=s
    for (case,rnd),ms in by.items():
        if 'macvtap' not in ms: continue
        mv=ms['macvtap']['values']['cpu_ns']
        for mode,s in ms.items():
            gaps.setdefault((case,b,mode),[]).append(s['values']['cpu_ns']-mv)
for (case,b,mode),g in sorted(gaps.items()):
    if mode=='macvtap': continue
    print(f"  {case} b={b:4d} {mode:18s} {st.median(g):+6.0f} [{min(g):+.0f}..{max(g):+.0f}] n={len(g)}")
