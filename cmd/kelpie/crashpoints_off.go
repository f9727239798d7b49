//go:build !kelpie_crashpoints

package main

// crashAt: a production build has no crash points (see crashpoints_on.go).
func crashAt(*env) string { return "" }
