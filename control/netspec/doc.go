// Package netspec holds the JSON types of the kata-network front-end (the interface and route
// objects of openEuler's `kata-runtime kata-network`), their decoding, their validation and the
// exact output forms the CLI prints.
//
// It exists so that the compatibility contract (../../../shared/spec/kata-network.md, copied
// into the project as the behaviour of these functions) lives in one small package without
// privileges or I/O: control uses it to check requests before it changes anything, and the fuzz
// tests drive it directly. Everything here is pure and safe for concurrent use.
package netspec
