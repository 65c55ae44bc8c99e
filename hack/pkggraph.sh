#!/usr/bin/env bash
# pkggraph.sh: print kata-dp's package graph (each package and the kata-dp packages it imports),
# from go list, so docs/architecture.md can be checked against the code. Test-only packages
# (*test) are marked; product packages must never import "testing".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mod=$(go list -m)
go list -f '{{.ImportPath}} {{join .Imports " "}}' ./... | while read -r pkg imports; do
	deps=()
	testing=""
	for i in $imports; do
		case "$i" in
		"$mod"/*) deps+=("${i#"$mod"/}") ;;
		testing) testing=" [imports testing]" ;;
		esac
	done
	printf '%s%s -> %s\n' "${pkg#"$mod"/}" "$testing" "${deps[*]:-}"
done
