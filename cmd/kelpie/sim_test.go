package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
)

func simCLI(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var o, e bytes.Buffer
	code = run(context.Background(), &env{stdout: &o, stderr: &e, getenv: func(string) string { return "" }}, append([]string{"sim"}, args...))
	return o.String(), e.String(), code
}

func TestSimSweepJSON(t *testing.T) {
	out, errOut, code := simCLI(t, "--seeds", "4", "--start-seed", "7", "--steps", "60", "--faults", "all", "--json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	var s struct {
		Runs, Steps, Teleports, Violations int
		RestoresRefused                    int    `json:"restores_refused"`
		FaultsInjected                     int    `json:"faults_injected"`
		TraceHash                          string `json:"trace_hash"`
	}
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, out)
	}
	if s.Runs != 4 || s.Steps != 240 || s.Teleports == 0 || s.FaultsInjected == 0 || s.Violations != 0 || len(s.TraceHash) != 64 {
		t.Fatalf("summary %+v", s)
	}
	again, _, _ := simCLI(t, "--seeds", "4", "--start-seed", "7", "--steps", "60", "--faults", "all", "--json")
	if again != out {
		t.Fatal("the same sweep printed a different summary")
	}
}

func TestSimSeedTraceAgreesWithSweep(t *testing.T) {
	trace, _, code := simCLI(t, "--seed", "7", "--steps", "60", "--trace", "--json")
	if code != 0 || !strings.HasPrefix(trace, "{") {
		t.Fatalf("exit %d, stdout %q", code, trace)
	}
	_, errOut, _ := simCLI(t, "--seed", "7", "--steps", "60", "--trace", "--json")
	if !strings.Contains(errOut, "dst seed=7 steps=60") {
		t.Fatalf("--trace --json did not print the trace on stderr: %q", errOut)
	}
	sweep, _, _ := simCLI(t, "--seeds", "1", "--start-seed", "7", "--steps", "60", "--json")
	var a, b struct {
		TraceHash string `json:"trace_hash"`
	}
	json.Unmarshal([]byte(trace), &a)
	json.Unmarshal([]byte(sweep), &b)
	if a.TraceHash == "" || a.TraceHash != b.TraceHash {
		t.Fatalf("--seed 7 hash %q, sweep of seed 7 hash %q", a.TraceHash, b.TraceHash)
	}
}

func TestSimPlantedBugFails(t *testing.T) {
	out, errOut, code := simCLI(t, "--seed", "1", "--bug", "resume-source-after-move", "--shrink")
	if code != 1 {
		t.Fatalf("exit %d, want 1\n%s%s", code, out, errOut)
	}
	for _, want := range []string{"SingleActivation violated", "replay: kelpie sim --seed 1 --steps 200 --hosts 4 --faults default --bug resume-source-after-move --trace", "shrunk from"} {
		if !strings.Contains(errOut, want) {
			t.Errorf("stderr lacks %q:\n%s", want, errOut)
		}
	}
	if !strings.Contains(out, "1 violations") {
		t.Errorf("stdout: %s", out)
	}
}

func TestSimUsageErrors(t *testing.T) {
	for _, args := range [][]string{
		{"--seeds", "0"},
		{"--trace"},
		{"--seed", "1", "--seeds", "3"},
		{"--faults", "sideways"},
		{"--faults", "default,vm.crash=7"},
		{"--bug", "nope"},
		{"--hosts", "0"},
		{"--steps", "-3"},
		{"extra"},
	} {
		_, errOut, code := simCLI(t, args...)
		if code != 2 || strings.Count(errOut, "\n") != 1 {
			t.Errorf("%v: exit %d, stderr %q; want exit 2 and one line", args, code, errOut)
		}
	}
}

// `kelpie sim fleet` runs the production move protocol over simulated
// daemons, a registry and a store: a sweep passes and repeats itself; a
// planted bug fails it with a replay command that reproduces the failure.
func TestSimFleet(t *testing.T) {
	out, errOut, code := simCLI(t, "fleet", "--seeds", "6", "--steps", "120", "--json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	var s struct {
		Runs, Steps, Moves, Claims, Violations int
		DaemonKills                            int    `json:"daemon_kills"`
		TraceHash                              string `json:"trace_hash"`
	}
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, out)
	}
	if s.Runs != 6 || s.Steps != 720 || s.Moves == 0 || s.DaemonKills == 0 || s.Claims == 0 || s.Violations != 0 || len(s.TraceHash) != 64 {
		t.Fatalf("summary %+v", s)
	}
	if again, _, _ := simCLI(t, "fleet", "--seeds", "6", "--steps", "120", "--json"); again != out {
		t.Fatal("the same fleet sweep printed a different summary")
	}
	_, errOut, code = simCLI(t, "fleet", "--seeds", "10", "--bug", "skip-claim-check")
	i := strings.Index(errOut, "replay: kelpie sim fleet --seed ")
	if code != 1 || !strings.Contains(errOut, "SingleActivation violated") || i < 0 {
		t.Fatalf("planted bug: exit %d, stderr %q", code, errOut)
	}
	replay := strings.Fields(strings.SplitN(errOut[i+len("replay: kelpie sim "):], "\n", 2)[0])
	trace, _, code := simCLI(t, replay...)
	if code != 1 || !strings.Contains(trace, "VIOLATION SingleActivation") {
		t.Fatalf("replay %v: exit %d, trace without the violation", replay, code)
	}
	if _, errOut, code := simCLI(t, "fleet", "--hosts", "1"); code != 2 || !strings.Contains(errOut, "--hosts") {
		t.Fatalf("one host: exit %d, %q", code, errOut)
	}
}
