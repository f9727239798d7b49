package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kelpie/teleport/vm"
)

// Tests here need no KVM: the probe is injected, or a fake QEMU (this test
// binary under another name) plays the part.

func TestParseAccel(t *testing.T) {
	for in, want := range map[string]Accel{"": AccelAuto, "auto": AccelAuto, "kvm": AccelKVM, "tcg": AccelTCG} {
		if got, err := ParseAccel(in); err != nil || got != want {
			t.Errorf("ParseAccel(%q) = %q, %v", in, got, err)
		}
	}
	if _, err := ParseAccel("hvf"); !errors.Is(err, vm.ErrInvalidConfig) {
		t.Errorf("ParseAccel(hvf) = %v", err)
	}
}

// fakeProbe is an injected KVM probe that counts its runs.
type fakeProbe struct {
	runs    atomic.Int32
	outcome probeOutcome
	err     error
}

func (p *fakeProbe) probe(ctx context.Context, in accelInputs) (probeOutcome, error) {
	p.runs.Add(1)
	return p.outcome, p.err
}

// fakeClock is a settable now.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time          { return c.t }
func (c *fakeClock) advance(d time.Duration) { c.t = c.t.Add(d) }

// accelFixture is a machine (one verdict file) with a fake probe, a fake
// clock and a /dev/kvm that opens.
type accelFixture struct {
	cache string
	probe *fakeProbe
	clock *fakeClock
}

func newAccelFixture(t *testing.T, o probeOutcome) *accelFixture {
	return &accelFixture{
		cache: filepath.Join(t.TempDir(), "cache", "kelpie", accelCacheFile),
		probe: &fakeProbe{outcome: o},
		clock: &fakeClock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)},
	}
}

// inputs are one home's accelInputs on the fixture's machine.
func (fx *accelFixture) inputs(t *testing.T) accelInputs {
	return accelInputs{home: t.TempDir(), binary: "/nonexistent/qemu", qemuVersion: "7.2.22",
		cache: fx.cache, probe: fx.probe.probe, now: fx.clock.now, kvmDevice: func() error { return nil }}
}

// resolve runs resolveAccel and checks how many probes have run so far.
func (fx *accelFixture) resolve(t *testing.T, in accelInputs, want Accel, wantRuns int32) (Accel, string) {
	t.Helper()
	a, why, err := resolveAccel(context.Background(), in, want)
	if err != nil {
		t.Fatalf("resolveAccel(%s): %v", want, err)
	}
	if n := fx.probe.runs.Load(); n != wantRuns {
		t.Fatalf("resolveAccel(%s): %d probes so far, want %d", want, n, wantRuns)
	}
	return a, why
}

func (fx *accelFixture) stored(t *testing.T) accelVerdict {
	t.Helper()
	b, err := os.ReadFile(fx.cache)
	if err != nil {
		t.Fatalf("verdict file: %v", err)
	}
	var v accelVerdict
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("verdict file %s: %v", b, err)
	}
	return v
}

// A timeout is unusable now but expires: a kelpie after the expiry probes
// again (old code kept it until QEMU, the kernel or the CPU changed).
func TestVerdictTimeoutExpires(t *testing.T) {
	fx := newAccelFixture(t, probeOutcome{kind: verdictTimeout})
	in := fx.inputs(t)
	a, why := fx.resolve(t, in, AccelAuto, 1)
	if a != AccelTCG || !strings.Contains(why, "printed nothing in 6s") || !strings.Contains(why, "will re-probe after 2025-03-02T12:00:00Z") {
		t.Fatalf("timeout verdict: %s %q", a, why)
	}
	v := fx.stored(t)
	if v.Kind != verdictTimeout || v.KVMUsable || !v.ProbedAt.Equal(fx.clock.t) || !v.ExpiresAt.Equal(fx.clock.t.Add(accelTimeoutVerdictTTL)) {
		t.Fatalf("stored %+v", v)
	}
	fx.clock.advance(accelTimeoutVerdictTTL - time.Second)
	fx.resolve(t, in, AccelAuto, 1)
	fx.clock.advance(time.Second)
	fx.probe.outcome = probeOutcome{kind: verdictBooted}
	if a, _ := fx.resolve(t, in, AccelAuto, 2); a != AccelKVM {
		t.Fatalf("after the expiry, the re-probe's verdict is ignored: %s", a)
	}
	if v := fx.stored(t); v.Kind != verdictBooted || !v.ExpiresAt.IsZero() {
		t.Fatalf("re-probe not stored: %+v", v)
	}
}

// An exit QEMU did not explain is no proof either: it expires too.
func TestVerdictUnexplainedExitExpires(t *testing.T) {
	fx := newAccelFixture(t, probeOutcome{kind: verdictExited, detail: "signal: killed"})
	in := fx.inputs(t)
	if a, why := fx.resolve(t, in, AccelAuto, 1); a != AccelTCG || !strings.Contains(why, "signal: killed") || !strings.Contains(why, "will re-probe after") {
		t.Fatalf("exit verdict: %s %q", a, why)
	}
	fx.clock.advance(accelTimeoutVerdictTTL)
	fx.resolve(t, in, AccelAuto, 2)
}

// Success and a definite KVM failure hold until the key changes, however
// old they are.
func TestVerdictDefiniteCachedUntilKeyChanges(t *testing.T) {
	for _, tc := range []struct {
		outcome probeOutcome
		want    Accel
	}{
		{probeOutcome{kind: verdictBooted}, AccelKVM},
		{probeOutcome{kind: verdictKVMError, detail: "error: failed to set MSR 0x10a to 0x69"}, AccelTCG},
	} {
		t.Run(string(tc.outcome.kind), func(t *testing.T) {
			fx := newAccelFixture(t, tc.outcome)
			in := fx.inputs(t)
			if a, _ := fx.resolve(t, in, AccelAuto, 1); a != tc.want {
				t.Fatalf("chose %s", a)
			}
			if v := fx.stored(t); v.Kind != tc.outcome.kind || !v.ExpiresAt.IsZero() {
				t.Fatalf("stored %+v", v)
			}
			fx.clock.advance(10 * 365 * 24 * time.Hour)
			if a, _ := fx.resolve(t, in, AccelAuto, 1); a != tc.want {
				t.Fatalf("cached: chose %s", a)
			}
			in.qemuVersion = "8.2.0"
			fx.resolve(t, in, AccelAuto, 2)
			fx.resolve(t, in, AccelAuto, 2)
		})
	}
}

// A probe the caller's ctx cut short is no verdict: an error, nothing
// cached, and the next kelpie probes. That holds also when the probe
// reports silence because it was cut short (old code cached that).
func TestVerdictCtxCancelledCachesNothing(t *testing.T) {
	for _, tc := range []struct {
		name    string
		outcome probeOutcome
		err     error
	}{
		{"probe error", probeOutcome{}, context.Canceled},
		{"silence while cancelled", probeOutcome{kind: verdictTimeout}, nil},
		{"exit while cancelled", probeOutcome{kind: verdictExited}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fx := newAccelFixture(t, tc.outcome)
			fx.probe.err = tc.err
			in := fx.inputs(t)
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			for _, want := range []Accel{AccelAuto, AccelKVM} {
				if a, _, err := resolveAccel(ctx, in, want); !errors.Is(err, context.Canceled) {
					t.Fatalf("%s with a cancelled ctx: %s, %v", want, a, err)
				}
			}
			if _, err := os.Stat(fx.cache); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("cancelled probe cached a verdict: %v", err)
			}
			fx.probe.err, fx.probe.outcome = nil, probeOutcome{kind: verdictBooted}
			if a, _ := fx.resolve(t, in, AccelAuto, 3); a != AccelKVM {
				t.Fatalf("after a cancelled probe: %s", a)
			}
		})
	}
}

// The verdict is the machine's: a second home (a second factory) reuses
// it without probing, and neither home holds it (old code kept one per
// home, so every fresh home probed).
func TestVerdictSharedByHomes(t *testing.T) {
	fx := newAccelFixture(t, probeOutcome{kind: verdictKVMError, detail: "KVM internal error. Suberror: 1"})
	first, second := fx.inputs(t), fx.inputs(t)
	fx.resolve(t, first, AccelAuto, 1)
	if a, why := fx.resolve(t, second, AccelAuto, 1); a != AccelTCG || !strings.Contains(why, "Suberror: 1") {
		t.Fatalf("second home: %s %q", a, why)
	}
	for _, home := range []string{first.home, second.home} {
		if _, err := os.Stat(filepath.Join(home, accelCacheFile)); err == nil {
			t.Fatalf("verdict written into home %s", home)
		}
	}
}

// A verdict file that does not parse, or parses into something that is not
// a whole verdict of this format, is re-probed and replaced.
func TestVerdictCorruptReprobes(t *testing.T) {
	key := accelKey("7.2.22")
	probed := time.Date(2025, 3, 1, 11, 0, 0, 0, time.UTC)
	whole := func(mod func(*accelVerdict)) string {
		v := accelVerdict{Version: accelVerdictVersion, Key: key, Kind: verdictKVMError, Reason: "cached", ProbedAt: probed}
		mod(&v)
		b, _ := json.Marshal(v)
		return string(b)
	}
	good := whole(func(*accelVerdict) {})
	for name, content := range map[string]string{
		"empty":     "",
		"garbage":   "\x00\x17not json",
		"truncated": good[:len(good)/2],
		"trailing":  good + "}",
		// What old code wrote into each home: no version, no kind. Old code
		// trusted it forever.
		"old per-home format": fmt.Sprintf(`{"key":%q,"kvm_usable":false,"reason":"cached: no","probe_ms":6001}`, key),
		"no version":          whole(func(v *accelVerdict) { v.Version = 0 }),
		"future version":      whole(func(v *accelVerdict) { v.Version = accelVerdictVersion + 1 }),
		"unknown kind":        whole(func(v *accelVerdict) { v.Kind = "maybe" }),
		"usable kvm-error":    whole(func(v *accelVerdict) { v.KVMUsable = true }),
		"unusable booted":     whole(func(v *accelVerdict) { v.Kind = verdictBooted }),
		"timeout, no expiry":  whole(func(v *accelVerdict) { v.Kind = verdictTimeout }),
		"timeout from the future": whole(func(v *accelVerdict) {
			v.Kind, v.ProbedAt, v.ExpiresAt = verdictTimeout, probed.Add(48*time.Hour), probed.Add(72*time.Hour)
		}),
		"no probe time": whole(func(v *accelVerdict) { v.ProbedAt = time.Time{} }),
	} {
		t.Run(name, func(t *testing.T) {
			fx := newAccelFixture(t, probeOutcome{kind: verdictBooted})
			os.MkdirAll(filepath.Dir(fx.cache), 0o755)
			if err := os.WriteFile(fx.cache, []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
			if a, _ := fx.resolve(t, fx.inputs(t), AccelAuto, 1); a != AccelKVM {
				t.Fatalf("chose %s", a)
			}
			if v := fx.stored(t); v.Kind != verdictBooted || !v.holds(key, fx.clock.t) {
				t.Fatalf("not replaced: %+v", v)
			}
		})
	}
	// The control: the whole verdict those were made from is used as is.
	fx := newAccelFixture(t, probeOutcome{kind: verdictBooted})
	os.MkdirAll(filepath.Dir(fx.cache), 0o755)
	os.WriteFile(fx.cache, []byte(good), 0o644)
	if a, why := fx.resolve(t, fx.inputs(t), AccelAuto, 0); a != AccelTCG || why != "cached" {
		t.Fatalf("whole verdict not used: %s %q", a, why)
	}
}

// Kelpies that probe at once each replace the whole file: a reader sees
// one verdict or another, never a torn one.
func TestVerdictConcurrentWriters(t *testing.T) {
	cache := filepath.Join(t.TempDir(), "kelpie", accelCacheFile)
	key := accelKey("7.2.22")
	now := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	const writers, writesEach = 4, 50
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range writesEach {
				// Reasons of different lengths, so a torn file would show.
				o := probeOutcome{kind: verdictKVMError, detail: strings.Repeat("x", 1+(w*writesEach+i)%4000)}
				if err := writeVerdict(cache, newVerdict(key, o, now, now, accelProbeTimeout)); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	for reads := 0; ; reads++ {
		select {
		case <-done:
			if v, ok := readVerdict(cache); !ok || !v.holds(key, now) {
				t.Fatalf("final verdict %+v", v)
			}
			entries, _ := os.ReadDir(filepath.Dir(cache))
			if len(entries) != 1 {
				t.Fatalf("left behind %v", entries)
			}
			return
		default:
		}
		b, err := os.ReadFile(cache)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		var v accelVerdict
		if err != nil || json.Unmarshal(b, &v) != nil || !v.holds(key, now) {
			t.Fatalf("read %d: torn or bad verdict file (%v): %.80q", reads, err, b)
		}
	}
}

// A verdict file that cannot be written costs a probe per kelpie, never
// the command.
func TestVerdictCacheUnwritable(t *testing.T) {
	fx := newAccelFixture(t, probeOutcome{kind: verdictBooted})
	blocker := filepath.Join(t.TempDir(), "not-a-dir")
	os.WriteFile(blocker, nil, 0o644)
	fx.cache = filepath.Join(blocker, accelCacheFile)
	in := fx.inputs(t)
	if a, _ := fx.resolve(t, in, AccelAuto, 1); a != AccelKVM {
		t.Fatalf("chose %s", a)
	}
	fx.resolve(t, in, AccelKVM, 2)
	entries, _ := os.ReadDir(filepath.Dir(blocker))
	if len(entries) != 1 {
		t.Fatalf("left behind %v", entries)
	}
	in.cache = ""
	fx.resolve(t, in, AccelAuto, 3)
}

// An explicit kvm on a machine whose KVM cannot run guests is refused in
// one line that says why; tcg never probes; auto falls back.
func TestAccelExplicitKVM(t *testing.T) {
	for _, kind := range []verdictKind{verdictKVMError, verdictTimeout} {
		t.Run(string(kind), func(t *testing.T) {
			fx := newAccelFixture(t, probeOutcome{kind: kind, detail: "error: kvm run failed Bad address"})
			in := fx.inputs(t)
			_, _, err := resolveAccel(context.Background(), in, AccelKVM)
			if !errors.Is(err, vm.ErrUnsupported) || strings.Contains(err.Error(), "\n") || !strings.Contains(err.Error(), "cannot run guests") {
				t.Fatalf("--accel kvm: %v", err)
			}
			switch kind {
			case verdictKVMError:
				if !strings.Contains(err.Error(), "kvm run failed") || !strings.Contains(err.Error(), "remove "+fx.cache) {
					t.Fatalf("--accel kvm: %v", err)
				}
			case verdictTimeout:
				if !strings.Contains(err.Error(), "will re-probe after") {
					t.Fatalf("--accel kvm: %v", err)
				}
			}
			if a, _ := fx.resolve(t, in, AccelAuto, 1); a != AccelTCG {
				t.Fatalf("auto chose %s", a)
			}
		})
	}
	t.Run("tcg", func(t *testing.T) {
		fx := newAccelFixture(t, probeOutcome{kind: verdictBooted})
		in := fx.inputs(t)
		in.kvmDevice = func() error { t.Fatal("tcg looked at /dev/kvm"); return nil }
		if a, why := fx.resolve(t, in, AccelTCG, 0); a != AccelTCG || why != "requested" {
			t.Fatalf("tcg: %s %q", a, why)
		}
		if _, err := os.Stat(fx.cache); err == nil {
			t.Fatal("tcg wrote a verdict")
		}
	})
	t.Run("booted", func(t *testing.T) {
		fx := newAccelFixture(t, probeOutcome{kind: verdictBooted})
		if a, _ := fx.resolve(t, fx.inputs(t), AccelKVM, 1); a != AccelKVM {
			t.Fatalf("kvm: %s", a)
		}
	})
	t.Run("no /dev/kvm", func(t *testing.T) {
		fx := newAccelFixture(t, probeOutcome{kind: verdictBooted})
		in := fx.inputs(t)
		in.kvmDevice = func() error { return errors.New("/dev/kvm is not usable (permission denied)") }
		if _, _, err := resolveAccel(context.Background(), in, AccelKVM); !errors.Is(err, vm.ErrUnsupported) {
			t.Fatalf("kvm: %v", err)
		}
		if a, _ := fx.resolve(t, in, AccelAuto, 0); a != AccelTCG {
			t.Fatalf("auto: %s", a)
		}
	})
}

func TestAccelCacheDefault(t *testing.T) {
	t.Setenv(accelCacheEnv, "/srv/kelpie/accel.json")
	if got := accelCacheDefault(); got != "/srv/kelpie/accel.json" {
		t.Errorf("with %s: %s", accelCacheEnv, got)
	}
	t.Setenv(accelCacheEnv, "")
	t.Setenv("KELPIE_CACHE", "/var/cache/kelpie")
	if got := accelCacheDefault(); got != "/var/cache/kelpie/accel.json" {
		t.Errorf("with KELPIE_CACHE: %s", got)
	}
}

// QEMU log lines, and whether they say KVM cannot run the guest. Those
// marked "seen here" came from QEMU 7.2 on this project's CI machine; the
// others follow QEMU's message formats (accel/kvm, target/i386/kvm), and
// the last few of the first group exercise the generic rule.
func TestKVMFailureClassification(t *testing.T) {
	for _, tc := range []struct {
		log  string
		want string // the reason kvmFailure gives; "" for none
	}{
		// Seen here: -cpu host under the nested KVM (the probe's verdict).
		{"--- /usr/bin/qemu-system-x86_64 -accel kvm -cpu host\n" +
			"qemu-system-x86_64: -chardev socket,id=ser,path=serial.sock,server=on,wait=on: info: QEMU waiting for connection on: disconnected:unix:serial.sock,server=on\n" +
			"qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n" +
			"qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed.\n",
			"error: failed to set MSR 0x10a to 0x69; ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed."},
		// Seen here, as an unprivileged user: /dev/kvm not openable.
		{"Could not access KVM kernel module: Permission denied\nqemu-system-x86_64: -accel kvm: failed to initialize kvm: Permission denied\n",
			"Could not access KVM kernel module: Permission denied; -accel kvm: failed to initialize kvm: Permission denied"},
		{"Could not access KVM kernel module: No such file or directory\n", "Could not access KVM kernel module: No such file or directory"},
		{"qemu-system-x86_64: -accel kvm: invalid accelerator kvm\n", "-accel kvm: invalid accelerator kvm"},
		{"KVM internal error. Suberror: 1\nemulation failure\nEAX=00000000 EBX=00000000 ECX=00000000 EDX=000806f8\n",
			"KVM internal error. Suberror: 1; emulation failure"},
		{"error: kvm run failed Bad address\n", "error: kvm run failed Bad address"},
		{"KVM: entry failed, hardware error 0x80000021\n", "KVM: entry failed, hardware error 0x80000021"},
		{"qemu-system-x86_64: kvm_init_vcpu: kvm_get_vcpu failed (0): Operation not permitted\n",
			"kvm_init_vcpu: kvm_get_vcpu failed (0): Operation not permitted"},
		{"kvm does not support KVM_CAP_USER_MEMORY\nQEMU requires a kernel with KVM support\n", "kvm does not support KVM_CAP_USER_MEMORY"},
		{"qemu-system-x86_64: kvm_set_user_memory_region: KVM_SET_USER_MEMORY_REGION failed, slot=0, start=0x0, size=0x8000000: Invalid argument\n",
			"kvm_set_user_memory_region: KVM_SET_USER_MEMORY_REGION failed, slot=0, start=0x0, size=0x8000000: Invalid argument"},
		{"qemu-system-x86_64: -accel kvm: kvm: split irqchip not supported\n", "-accel kvm: kvm: split irqchip not supported"},

		// Not about KVM, or not fatal.
		{"", ""},
		{"qemu-system-x86_64: -chardev socket,id=ser,path=serial.sock,server=on,wait=on: info: QEMU waiting for connection on: disconnected:unix:serial.sock,server=on\n", ""},
		{"qemu-system-x86_64: warning: host doesn't support requested feature: CPUID.01H:ECX.pni [bit 0]\n", ""}, // seen here
		{"qemu-system-x86_64: warning: KVM: unsupported feature, continuing\n", ""},
		{"qemu-system-x86_64: terminating on signal 15 from pid 3092 (timeout)\n", ""}, // seen here
		{"qemu-system-x86_64: terminating on signal 9\n", ""},
		{"qemu-system-x86_64: unable to find CPU model 'foo'\n", ""}, // seen here
		{"qemu: could not load kernel '/srv/kvm-images/vmlinux': No such file or directory\n", ""},
		{"--- /usr/bin/qemu-system-x86_64 -accel kvm -cpu host -append console=ttyS0 panic=-1 failed\n", ""},
	} {
		if got := kvmFailure(tc.log); got != tc.want {
			t.Errorf("kvmFailure(%q)\n got %q\nwant %q", tc.log, got, tc.want)
		}
	}
	// How a probe that printed nothing ends.
	const silent = "qemu-system-x86_64: warning: host doesn't support requested feature: CPUID.01H:ECX.pni [bit 0]\n"
	const msr = "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n"
	for _, tc := range []struct {
		log    string
		exited bool
		want   verdictKind
	}{
		{silent, false, verdictTimeout},
		{silent, true, verdictExited},
		{msr, true, verdictKVMError},
		{"KVM internal error. Suberror: 1\nemulation failure\n", false, verdictKVMError}, // QEMU pauses, stays up
	} {
		if got := classifyProbe(tc.log, tc.exited, nil); got.kind != tc.want {
			t.Errorf("classifyProbe(%q, exited %v) = %+v, want %s", tc.log, tc.exited, got, tc.want)
		}
	}
}

// fakeQEMUPrefix names this test binary when it plays QEMU: run through a
// link named fake-qemu-MODE, it acts out MODE (see fakeQEMU).
const fakeQEMUPrefix = "fake-qemu-"

func init() {
	if mode, ok := strings.CutPrefix(filepath.Base(os.Args[0]), fakeQEMUPrefix); ok {
		os.Exit(fakeQEMU(mode, os.Args[1:]))
	}
}

// fakeQEMU plays QEMU under -accel kvm for probeKVM, as the machines it
// must tell apart behave. Lines go to stderr, which spawn sends to the log.
func fakeQEMU(mode string, args []string) int {
	// Never outlive a test that forgot us.
	time.AfterFunc(30*time.Second, func() { os.Exit(3) })
	say := func(lines ...string) {
		for _, l := range lines {
			fmt.Fprintln(os.Stderr, l)
		}
	}
	switch mode {
	case "no-kvm-module":
		say("Could not access KVM kernel module: No such file or directory",
			"qemu-system-x86_64: -accel kvm: failed to initialize kvm: No such file or directory")
		return 1
	case "bad-kernel":
		say("qemu-system-x86_64: could not load kernel 'vmlinux': No such file or directory")
		return 1
	}
	sock := ""
	for i, a := range args {
		if a == "-chardev" && i+1 < len(args) {
			for _, kv := range strings.Split(args[i+1], ",") {
				if p, ok := strings.CutPrefix(kv, "path="); ok {
					sock = p
				}
			}
		}
	}
	l, err := net.Listen("unix", sock)
	if err != nil {
		say("fake qemu: " + err.Error())
		return 1
	}
	say("qemu-system-x86_64: -chardev socket,id=ser,path=serial.sock,server=on,wait=on: info: QEMU waiting for connection on: disconnected:unix:serial.sock,server=on")
	c, err := l.Accept()
	if err != nil {
		return 1
	}
	defer c.Close()
	switch mode {
	case "boots":
		c.Write([]byte("Linux version 6.1.0-kelpie\n"))
	case "boots-and-exits":
		c.Write([]byte("Linux version 6.1.0-kelpie\n"))
		return 0
	case "msr-abort":
		say("qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69",
			"qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed.")
		return 134
	case "emulation-failure":
		// QEMU stops the guest and waits, silent, for a monitor.
		say("KVM internal error. Suberror: 1", "emulation failure", "EAX=00000000 EBX=00000000 ECX=00000000 EDX=000806f8")
	case "silent":
		say("qemu-system-x86_64: warning: host doesn't support requested feature: CPUID.01H:ECX.pni [bit 0]")
	}
	time.Sleep(time.Minute)
	return 0
}

// fakeQEMUBinary links this test binary under the name for mode.
func fakeQEMUBinary(t *testing.T, mode string) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(t.TempDir(), fakeQEMUPrefix+mode)
	if err := os.Symlink(self, link); err != nil {
		t.Fatal(err)
	}
	return link
}

// probeKVM against fakes of each kind of machine: what QEMU said decides,
// not only whether the guest printed. The ones that end on their own must
// not wait out the deadline.
func TestProbeKVMOutcomes(t *testing.T) {
	for _, tc := range []struct {
		mode    string
		timeout time.Duration
		want    verdictKind
		detail  string
	}{
		{"boots", 10 * time.Second, verdictBooted, ""},
		{"boots-and-exits", 10 * time.Second, verdictBooted, ""},
		{"no-kvm-module", 10 * time.Second, verdictKVMError, "failed to initialize kvm"},
		{"msr-abort", 10 * time.Second, verdictKVMError, "failed to set MSR 0x10a"},
		{"bad-kernel", 10 * time.Second, verdictExited, "could not load kernel"},
		{"emulation-failure", 10 * time.Second, verdictKVMError, "emulation failure"},
		{"silent", time.Second, verdictTimeout, ""},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			t.Parallel()
			in := accelInputs{home: t.TempDir(), binary: fakeQEMUBinary(t, tc.mode), kernel: "vmlinux", initrd: "initrd",
				probeTimeout: tc.timeout}
			start := time.Now()
			got, err := probeKVM(context.Background(), in)
			took := time.Since(start)
			if err != nil {
				t.Fatalf("probeKVM: %v", err)
			}
			if got.kind != tc.want || !strings.Contains(got.detail, tc.detail) {
				t.Fatalf("probeKVM = %+v, want %s with %q", got, tc.want, tc.detail)
			}
			if tc.want != verdictTimeout && took > tc.timeout/2 {
				t.Fatalf("took %v: waited for the deadline", took)
			}
			if entries, _ := os.ReadDir(in.home); len(entries) != 0 {
				t.Fatalf("probe left %v", entries)
			}
		})
	}
}

// probeKVM whose ctx ends while the guest is silent gives no verdict.
func TestProbeKVMCtxCancelled(t *testing.T) {
	in := accelInputs{home: t.TempDir(), binary: fakeQEMUBinary(t, "silent"), kernel: "vmlinux", initrd: "initrd",
		probeTimeout: 10 * time.Second, cache: filepath.Join(t.TempDir(), accelCacheFile),
		kvmDevice: func() error { return nil }}
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, _, err := resolveAccel(ctx, in, AccelAuto); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("resolveAccel: %v", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("took %v", took)
	}
	if _, err := os.Stat(in.cache); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("cached a verdict: %v", err)
	}
}

// TestAccelProbe runs the real probe on this host: whatever the verdict,
// it must be consistent, explain itself, and be cached for the machine, so
// a second home does not probe again.
func TestAccelProbe(t *testing.T) {
	needQEMU(t)
	ctx := testCtx(t, time.Minute)
	cache := filepath.Join(t.TempDir(), accelCacheFile)
	f, err := NewFactory(ctx, Options{Home: t.TempDir(), HostID: "h", Accel: AccelAuto, AccelCache: cache})
	if err != nil {
		t.Fatal(err)
	}
	a, why := f.Accel()
	t.Logf("auto chose %s: %s", a, why)
	if why == "" || (a != AccelKVM && a != AccelTCG) {
		t.Fatalf("accel %q, reason %q", a, why)
	}
	var v accelVerdict
	if kvmDeviceUsable() == nil {
		b, err := os.ReadFile(cache)
		if err != nil || json.Unmarshal(b, &v) != nil || v.KVMUsable != (a == AccelKVM) || v.Reason != why {
			t.Fatalf("verdict not cached consistently: %s, %v", b, err)
		}
		t.Logf("verdict file: %s", b)
	}
	start := time.Now()
	f2, err := NewFactory(ctx, Options{Home: t.TempDir(), HostID: "h", Accel: AccelAuto, AccelCache: cache})
	if err != nil {
		t.Fatal(err)
	}
	if a2, _ := f2.Accel(); a2 != a || time.Since(start) > 2*time.Second {
		t.Fatalf("second home chose %s in %v", a2, time.Since(start))
	}
	if kvmDeviceUsable() == nil {
		var v2 accelVerdict
		b, _ := os.ReadFile(cache)
		if json.Unmarshal(b, &v2) != nil || !v2.ProbedAt.Equal(v.ProbedAt) {
			t.Fatalf("second home probed again: %s", b)
		}
	}
	if f.Host().Compat["accel"] != string(a) {
		t.Fatalf("host compat %v", f.Host().Compat)
	}
}
