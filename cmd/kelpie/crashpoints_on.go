//go:build kelpie_crashpoints

package main

// crashAt is where the crash tests want the daemon to kill itself
// (KELPIE_CRASH_AT). Only a binary built with -tags kelpie_crashpoints,
// as cmd/kelpie's crash tests build it, reads it.
func crashAt(e *env) string { return e.getenv("KELPIE_CRASH_AT") }
