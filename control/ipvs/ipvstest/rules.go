package ipvstest

import (
	"fmt"
	"strings"
)

// Rules is a kata-ipvs restore file (`ipvsadm --save -n` format) of the benchmarks' standard
// table: services rr services 10.100.0.0:80 upwards, each with three masqueraded real servers
// of weight 1, so services+3*services rules (5000 services: the user guide's 20000-rule limit).
// One definition, so that every benchmark of a restore, an encoding or a push at 20000 rules
// measures the same table.
func Rules(services int) string {
	var sb strings.Builder
	for i := range services {
		svc := fmt.Sprintf("10.%d.%d.%d:80", 100+i/65536, (i/256)%256, i%256)
		fmt.Fprintf(&sb, "-A -t %s -s rr\n", svc)
		for j := 1; j <= 3; j++ {
			fmt.Fprintf(&sb, "-a -t %s -r 172.16.%d.%d:80 -m -w 1\n", svc, j, i%250+1)
		}
	}
	return sb.String()
}
