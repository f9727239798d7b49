package qemu

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kelpie/teleport/guest/image"
	"github.com/kelpie/teleport/internal/atomicfile"
	"github.com/kelpie/teleport/vm"
)

// Accel is a QEMU accelerator choice.
type Accel string

// Accelerators. Auto uses KVM only where a probe showed it can run a guest.
const (
	AccelAuto Accel = "auto"
	AccelKVM  Accel = "kvm"
	AccelTCG  Accel = "tcg"
)

// ParseAccel parses --accel.
func ParseAccel(s string) (Accel, error) {
	switch a := Accel(s); a {
	case AccelAuto, AccelKVM, AccelTCG:
		return a, nil
	case "":
		return AccelAuto, nil
	}
	return "", fmt.Errorf("accelerator %q (want auto, kvm or tcg): %w", s, vm.ErrInvalidConfig)
}

// accelProbeTimeout bounds the KVM probe. Under working KVM the probe
// guest prints its first console line within a second; a nested KVM that
// cannot run guests (this project's CI: kvm_pvm) may accept -accel kvm and
// then never print at all.
const accelProbeTimeout = 6 * time.Second

// accelTimeoutVerdictTTL is how long a verdict that QEMU did not explain
// (silence until the deadline, or an exit without a KVM error) holds.
// Silence is what a nested KVM that never runs the guest looks like, but
// also what an overloaded host looks like, so it is trusted for a day
// rather than until QEMU, the kernel or the CPU changes.
const accelTimeoutVerdictTTL = 24 * time.Hour

// accelCacheFile names the verdict file in the Kelpie cache directory.
const accelCacheFile = "accel.json"

// accelCacheEnv overrides the verdict file's path.
const accelCacheEnv = "KELPIE_ACCEL_CACHE"

// accelVerdictVersion is the verdict file's format. A file of any other
// version (including the old per-home one, which had none) is re-probed.
const accelVerdictVersion = 1

// accelLogPollInterval is how often a running probe's QEMU log is read for
// a KVM error, so a QEMU that stops the guest and stays up does not cost
// the whole accelProbeTimeout.
const accelLogPollInterval = 100 * time.Millisecond

// accelLogMaxBytes bounds how much of the probe's QEMU log is read. KVM
// errors come first; what follows (a register dump) is not needed.
const accelLogMaxBytes = 64 << 10

// accelCacheDefault is the verdict file NewFactory uses unless told
// otherwise: $KELPIE_ACCEL_CACHE, else accel.json in the Kelpie cache
// ($KELPIE_CACHE, else ~/.cache/kelpie) beside the guest image. It is one
// file per machine, not per home: KVM's usability is the machine's.
func accelCacheDefault() string {
	if p := os.Getenv(accelCacheEnv); p != "" {
		return p
	}
	return filepath.Join(image.CacheDir(), accelCacheFile)
}

// verdictKind is how a KVM probe ended, which decides how long its verdict
// holds.
type verdictKind string

const (
	// verdictBooted: the guest printed on its console under KVM. Usable;
	// holds until the key changes.
	verdictBooted verdictKind = "booted"
	// verdictKVMError: QEMU said KVM cannot run the guest. Unusable;
	// holds until the key changes.
	verdictKVMError verdictKind = "kvm-error"
	// verdictTimeout: nothing on the console and nothing from QEMU until
	// the deadline. Unusable; expires.
	verdictTimeout verdictKind = "timeout"
	// verdictExited: QEMU exited before the guest printed, without a KVM
	// error (killed, out of memory, a bad image). Unusable; expires, since
	// nothing says it was KVM.
	verdictExited verdictKind = "exited"
)

// expires reports whether a verdict of this kind is re-probed after
// accelTimeoutVerdictTTL.
func (k verdictKind) expires() bool { return k == verdictTimeout || k == verdictExited }

// accelVerdict is the machine's KVM verdict, as stored in the verdict file.
type accelVerdict struct {
	Version   int         `json:"version"`
	Key       string      `json:"key"` // what the verdict depends on; a change re-probes
	KVMUsable bool        `json:"kvm_usable"`
	Kind      verdictKind `json:"kind"`
	Reason    string      `json:"reason"`
	ProbedAt  time.Time   `json:"probed_at"`
	ExpiresAt time.Time   `json:"expires_at,omitzero"` // only for kinds that expire
	ProbeMs   int64       `json:"probe_ms"`
}

// holds reports whether v is a well-formed verdict for key that still
// stands at now. Anything else (another key, a hand-edited or half-understood
// file) means probe again.
func (v accelVerdict) holds(key string, now time.Time) bool {
	if v.Version != accelVerdictVersion || v.Key != key || v.ProbedAt.IsZero() {
		return false
	}
	switch v.Kind {
	case verdictBooted:
		return v.KVMUsable
	case verdictKVMError:
		return !v.KVMUsable
	case verdictTimeout, verdictExited:
		// A verdict from the future (the clock went back) cannot be trusted
		// to expire on time.
		return !v.KVMUsable && !now.Before(v.ProbedAt) && now.Before(v.ExpiresAt)
	}
	return false
}

// probeOutcome is how one KVM probe ended.
type probeOutcome struct {
	kind   verdictKind
	detail string // QEMU's KVM error, or the gist of its log for an exit
}

// accelInputs is what resolveAccel needs.
type accelInputs struct {
	home, binary, qemuVersion string
	kernel, initrd            string
	// cache is the machine's verdict file; "" caches nothing.
	cache string

	// Seams for tests; zero values mean the real thing.
	probe        func(context.Context, accelInputs) (probeOutcome, error) // probeKVM
	now          func() time.Time                                         // time.Now
	kvmDevice    func() error                                             // kvmDeviceUsable
	probeTimeout time.Duration                                            // accelProbeTimeout
}

func (in accelInputs) clock() time.Time {
	if in.now != nil {
		return in.now()
	}
	return time.Now()
}

func (in accelInputs) timeout() time.Duration {
	if in.probeTimeout > 0 {
		return in.probeTimeout
	}
	return accelProbeTimeout
}

// resolveAccel turns a requested accelerator into the one to use and says
// why. An explicit kvm is refused (not silently replaced) when this host's
// KVM is known not to run guests.
func resolveAccel(ctx context.Context, in accelInputs, want Accel) (Accel, string, error) {
	if want == AccelTCG {
		return AccelTCG, "requested", nil
	}
	device := in.kvmDevice
	if device == nil {
		device = kvmDeviceUsable
	}
	if err := device(); err != nil {
		if want == AccelKVM {
			return "", "", fmt.Errorf("--accel kvm: %v: %w", err, vm.ErrUnsupported)
		}
		return AccelTCG, err.Error(), nil
	}
	v, err := kvmVerdict(ctx, in)
	if err != nil {
		return "", "", err
	}
	if !v.KVMUsable {
		if want == AccelKVM {
			again := ""
			if in.cache != "" && !v.Kind.expires() {
				again = "; remove " + in.cache + " to probe again"
			}
			return "", "", fmt.Errorf("--accel kvm: KVM on this host cannot run guests (%s%s); use --accel tcg or auto: %w", v.Reason, again, vm.ErrUnsupported)
		}
		return AccelTCG, v.Reason, nil
	}
	return AccelKVM, v.Reason, nil
}

func kvmDeviceUsable() error {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("/dev/kvm is not usable (%v)", errors.Unwrap(err))
	}
	f.Close()
	return nil
}

// kvmVerdict returns the machine's verdict, probing when the verdict file
// holds none that stands. A probe cut short by the caller's ctx is no
// verdict: it returns an error and leaves the file alone.
func kvmVerdict(ctx context.Context, in accelInputs) (accelVerdict, error) {
	start := in.clock()
	key := accelKey(in.qemuVersion)
	if v, ok := readVerdict(in.cache); ok && v.holds(key, start) {
		return v, nil
	}
	probe := in.probe
	if probe == nil {
		probe = probeKVM
	}
	out, err := probe(ctx, in)
	if err == nil && out.kind != verdictBooted && ctx.Err() != nil {
		// Silence or an exit while the caller gave up says nothing about KVM.
		err = ctx.Err()
	}
	if err != nil {
		return accelVerdict{}, fmt.Errorf("qemu: KVM probe: %w", err)
	}
	v := newVerdict(key, out, start, in.clock(), in.timeout())
	if in.cache != "" {
		// Best effort: without the file the next kelpie probes again,
		// which is slower but still right.
		_ = writeVerdict(in.cache, v)
	}
	return v, nil
}

// newVerdict records a probe that started at start and ended at end.
func newVerdict(key string, o probeOutcome, start, end time.Time, timeout time.Duration) accelVerdict {
	switch o.kind {
	case verdictBooted, verdictKVMError, verdictTimeout, verdictExited:
	default:
		// Unknown means unexplained: treat it like an exit, which expires.
		o.kind = verdictExited
	}
	v := accelVerdict{Version: accelVerdictVersion, Key: key, Kind: o.kind,
		ProbedAt: end.UTC(), ProbeMs: end.Sub(start).Milliseconds()}
	if o.kind.expires() {
		v.ExpiresAt = v.ProbedAt.Add(accelTimeoutVerdictTTL)
	}
	until := v.ExpiresAt.Format(time.RFC3339)
	switch o.kind {
	case verdictBooted:
		v.KVMUsable = true
		v.Reason = "the KVM probe guest booted"
	case verdictKVMError:
		v.Reason = "QEMU cannot run a guest under KVM: " + o.detail
	case verdictTimeout:
		v.Reason = fmt.Sprintf("QEMU accepts -accel kvm but the probe guest printed nothing in %v (a nested KVM that cannot run guests?); will re-probe after %s", timeout, until)
	case verdictExited:
		v.Reason = fmt.Sprintf("QEMU exited under KVM before the probe guest printed anything (%s); will re-probe after %s", o.detail, until)
	}
	return v
}

// readVerdict reads the verdict file. A missing, unreadable or corrupt
// file is no verdict.
func readVerdict(path string) (accelVerdict, bool) {
	if path == "" {
		return accelVerdict{}, false
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return accelVerdict{}, false
	}
	var v accelVerdict
	if json.Unmarshal(b, &v) != nil {
		return accelVerdict{}, false
	}
	return v, true
}

// writeVerdict replaces the verdict file whole, durably: concurrent
// kelpies each rename a whole file, so a reader sees one verdict or
// another, never a torn one. It is readable by other users of a shared
// KELPIE_ACCEL_CACHE.
func writeVerdict(path string, v accelVerdict) error {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // QEMU's messages hold "->"; keep them legible
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		return fmt.Errorf("KVM verdict: %w", err)
	}
	if err := atomicfile.WriteFile(path, buf.Bytes(), 0o644, atomicfile.Sync); err != nil {
		return fmt.Errorf("KVM verdict %s: %w", path, err)
	}
	return nil
}

// accelKey names what a verdict depends on: the QEMU build, the host
// kernel and the CPU.
func accelKey(qemuVersion string) string {
	return strings.Join([]string{"qemu " + qemuVersion, "kernel " + kernelRelease(), "cpu " + cpuModel()}, "; ")
}

// cpuModel is /proc/cpuinfo's first "model name".
func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

// kvmFailurePhrases, lower case, are QEMU messages that say KVM cannot
// run the guest even where the line does not name KVM.
var kvmFailurePhrases = []string{
	"could not access kvm kernel module", // /dev/kvm cannot be opened
	"failed to initialize kvm",           // KVM_CREATE_VM or a capability check failed
	"invalid accelerator kvm",            // QEMU built without KVM
	"kvm does not support",               // a capability QEMU needs is missing
	"kvm version too old",
	"kvm internal error",           // KVM_EXIT_INTERNAL_ERROR
	"emulation failure",            // its commonest suberror
	"kvm run failed",               // KVM_RUN itself failed
	"entry failed, hardware error", // the CPU refused VM entry
	"failed to set msr",            // a nested KVM lacking an MSR -cpu host names (QEMU then asserts)
	"failed to get msr",
	"kvm_init_vcpu",
}

// kvmFailureWords, lower case, mark a line that names KVM as an error
// rather than a mention.
var kvmFailureWords = []string{"error", "fail", "unsupported", "not supported", "assertion", "abort"}

// kvmFailure returns the lines of a probe's QEMU log that say KVM cannot
// run the guest, joined, or "" when there are none. Warnings and notes
// never count (QEMU runs on after them); a line counts when it holds one
// of kvmFailurePhrases, or names KVM outside a file path together with one
// of kvmFailureWords.
func kvmFailure(log string) string {
	var found []string
	for _, l := range logLines(log) {
		low := strings.ToLower(l)
		hit := false
		for _, p := range kvmFailurePhrases {
			hit = hit || strings.Contains(low, p)
		}
		if !hit {
			// A path (the kernel's, a source file's) may hold "kvm" by chance.
			var words []string
			for _, w := range strings.Fields(low) {
				if !strings.Contains(w, "/") {
					words = append(words, w)
				}
			}
			rest := strings.Join(words, " ")
			if strings.Contains(rest, "kvm") {
				for _, w := range kvmFailureWords {
					hit = hit || strings.Contains(rest, w)
				}
			}
		}
		if hit && len(found) < 3 {
			found = append(found, l)
		}
	}
	return strings.Join(found, "; ")
}

// logLines are a QEMU log's lines that may say what went wrong: not the
// command line spawn logs, not warnings or notes, without the program name.
func logLines(log string) []string {
	var keep []string
	for _, l := range strings.Split(log, "\n") {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "--- ") || strings.Contains(l, "warning:") || strings.Contains(l, "info:") {
			continue
		}
		if prog, rest, ok := strings.Cut(l, ": "); ok && strings.HasPrefix(prog, "qemu-system-") {
			l = rest
		}
		keep = append(keep, l)
	}
	return keep
}

// logGist is the last few meaningful lines of a QEMU log, for a one-line
// reason.
func logGist(log string) string {
	l := logLines(log)
	if len(l) > 3 {
		l = l[len(l)-3:]
	}
	if len(l) == 0 {
		return "no error logged"
	}
	return strings.Join(l, "; ")
}

// readLogHead reads the start of a log file.
func readLogHead(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	b, _ := io.ReadAll(io.LimitReader(f, accelLogMaxBytes))
	return string(b)
}

// classifyProbe decides how a probe in which the guest printed nothing
// ended: a KVM error in QEMU's log is definite whether QEMU exited or not
// (after an emulation failure it stays up, silent); otherwise an exit or
// silence, neither of which proves anything about KVM.
func classifyProbe(log string, exited bool, exitErr error) probeOutcome {
	if why := kvmFailure(log); why != "" {
		return probeOutcome{kind: verdictKVMError, detail: why}
	}
	if exited {
		detail := logGist(log)
		if exitErr != nil {
			detail += "; " + exitErr.Error()
		}
		return probeOutcome{kind: verdictExited, detail: detail}
	}
	return probeOutcome{kind: verdictTimeout}
}

// probeKVM boots the guest kernel under KVM with its serial port on a
// socket that QEMU waits for, and reports how that ended: console output
// means KVM runs guests; otherwise QEMU's log and whether it exited decide
// (classifyProbe). An error, never an outcome, means there is no verdict:
// the caller's ctx ended or QEMU could not be started.
func probeKVM(ctx context.Context, in accelInputs) (probeOutcome, error) {
	dir, err := os.MkdirTemp(in.home, "accel-probe-")
	if err != nil {
		return probeOutcome{}, err
	}
	defer os.RemoveAll(dir)
	logPath := filepath.Join(dir, "qemu.log")
	args := []string{
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-accel", "kvm", "-cpu", "host",
		"-M", "microvm,x-option-roms=off,rtc=on,isa-serial=on",
		"-m", "128M", "-smp", "1",
		"-kernel", in.kernel, "-initrd", in.initrd,
		"-append", "console=ttyS0 earlyprintk=ttyS0 reboot=t panic=-1",
		"-chardev", "socket,id=ser,path=serial.sock,server=on,wait=on",
		"-serial", "chardev:ser",
	}
	p, err := spawn(in.binary, args, dir, logPath)
	if err != nil {
		return probeOutcome{}, err
	}
	defer p.kill(context.WithoutCancel(ctx))
	pctx, cancel := context.WithTimeout(ctx, in.timeout())
	defer cancel()
	// A QEMU that cannot open KVM exits before it listens: stop dialling
	// then instead of waiting out the deadline.
	dctx, stopDial := context.WithCancel(pctx)
	defer stopDial()
	go func() {
		select {
		case <-p.done():
			stopDial()
		case <-dctx.Done():
		}
	}()
	conn, err := dialUnix(dctx, filepath.Join(dir, "serial.sock"))
	if err != nil && dctx.Err() == nil {
		// Neither an exit nor the deadline: the probe itself is broken.
		return probeOutcome{}, fmt.Errorf("KVM probe console: %w", err)
	}
	if err == nil {
		defer conn.Close()
		printed := make(chan bool, 1)
		go func() {
			var b [64]byte
			n, _ := conn.Read(b[:])
			printed <- n > 0
		}()
		tick := time.NewTicker(accelLogPollInterval)
		defer tick.Stop()
		var ok bool
	wait:
		for {
			select {
			case ok = <-printed:
				if !ok {
					// The console closed: QEMU is going. Let it finish its log.
					select {
					case <-p.done():
					case <-pctx.Done():
					}
				}
				break wait
			case <-p.done():
				// What the guest printed before QEMU went is still in the
				// socket, and the closed peer makes the read return at once.
				select {
				case ok = <-printed:
				case <-pctx.Done():
				}
				break wait
			case <-pctx.Done():
				break wait
			case <-tick.C:
				// After an emulation failure QEMU pauses the guest and
				// waits; its log already says why.
				if kvmFailure(readLogHead(logPath)) != "" {
					break wait
				}
			}
		}
		if ok {
			return probeOutcome{kind: verdictBooted}, nil
		}
	}
	if ctx.Err() != nil {
		return probeOutcome{}, ctx.Err()
	}
	exited, exitErr := false, error(nil)
	select {
	case <-p.done():
		exited, exitErr = true, p.waitErr
	default:
	}
	return classifyProbe(readLogHead(logPath), exited, exitErr), nil
}
