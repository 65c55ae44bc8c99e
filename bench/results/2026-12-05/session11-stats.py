# Summarises session11-lb-restore.txt (what session11-measure.sh wrote): min / median / max over the rounds of each
# build, and the paired difference new - old of the same round. python3 session11-stats.py
import re, statistics as st, collections
rounds=[]; cur=None
for line in open('session11-lb-restore.txt'):
    if line.startswith('ROUND'):
        cur={'load':float(line.split()[2]),'old':{},'new':{}}; rounds.append(cur); continue
    if line.startswith('DONE') or cur is None: continue
    parts=line.split()
    b=parts[0]; name=re.sub(r'-\d+$','',parts[1])
    toks=parts[5:]
    for v,k in zip(toks[0::2],toks[1::2]):
        cur[b][name+':'+k]=float(v)
def derived(d):
    out={}
    g=lambda k: d.get(k)
    pp='BenchmarkPerPacket:'
    if g(pp+'no-service-median-ns') is not None:
        ns=g(pp+'no-service-median-ns')
        out['PerPacket fresh new conn over no-service']=g(pp+'new-conn-median-ns')-ns
        out['PerPacket fresh established dnat over no-service']=g(pp+'established-median-ns')-ns
        out['PerPacket no-service ns']=ns
    r='BenchmarkPerPacketRepeat:'
    if g(r+'no-service-median-ns') is not None:
        out['Repeat established dnat over no-service']=g(r+'established-dnat-median-ns')-g(r+'no-service-median-ns')
        out['Repeat no-service ns']=g(r+'no-service-median-ns')
    t='BenchmarkNewConnTable:'
    for k in ['ct-16384-ns','ct-64-ns','ct-16384-over-ct-64-ns']:
        if g(t+k) is not None: out['NewConnTable '+k]=g(t+k)
    c='BenchmarkRestoreCLI:'
    for k in ['median-ms','min-ms','cli-cpu-ms','agent-cpu-ms','agent-cycle-cpu-ms']:
        if g(c+k) is not None: out['RestoreCLI '+k]=g(c+k)
    return out
rows=collections.OrderedDict()
for rd in rounds:
    o=derived(rd['old']); n=derived(rd['new'])
    for k in o:
        if k in n: rows.setdefault(k,[]).append((o[k],n[k]))
loads=[r['load'] for r in rounds]
print('rounds',len(rounds),'load %.2f-%.2f'%(min(loads),max(loads)))
def mmm(xs): return '%.1f / %.1f / %.1f'%(min(xs),st.median(xs),max(xs))
for k,v in rows.items():
    o=[a for a,b in v]; n=[b for a,b in v]; d=[b-a for a,b in v]
    print('%-50s old %-22s new %-22s paired %s'%(k,mmm(o),mmm(n),mmm(d)))
