package qemu

import (
	"context"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/store/fs"
	"github.com/kelpie/teleport/vm"
)

// clockSlack is how far the guest's wall clock may be from the host's
// after a resume (the bound).
const clockSlack = 50 * time.Millisecond

func guestTime(t *testing.T, ctx context.Context, inst vm.Instance) vm.GuestTime {
	t.Helper()
	gt, err := inst.(*Instance).GuestTime(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return gt
}

// checkClock asserts the guest's wall clock is within clockSlack of the
// host's, the reading's own uncertainty (half its round trip) included.
func checkClock(t *testing.T, what string, gt vm.GuestTime) {
	t.Helper()
	off := gt.Offset()
	if off < 0 {
		off = -off
	}
	t.Logf("%s: guest clock %+v off the host's (read in %v)", what, gt.Offset(), gt.RoundTrip)
	if off+gt.RoundTrip/2 > clockSlack {
		t.Fatalf("%s: the guest's wall clock is %v off the host's (read in %v), more than %v", what, gt.Offset(), gt.RoundTrip, clockSlack)
	}
}

// After every resume the guest's wall clock is set from the host before
// its next command: after a pause, and after a package waited 30 s in the
// store before its restore on another home. Its monotonic clock never
// goes back. Inside the guest, kelpie-agent -now reads the wall clock to
// the nanosecond.
func TestClock(t *testing.T) {
	// Mostly waiting (for the store, for the guest's uptime): it runs
	// beside the other waiting test.
	t.Parallel()
	ctx := testCtx(t, 3*time.Minute)
	fa, fb := newTestFactory(t, "host-a"), newTestFactory(t, "host-b")
	src := bootVM(t, ctx, fa, testConfig("clock", 256))
	checkClock(t, "after boot", guestTime(t, ctx, src))

	out := mustShell(t, ctx, src, "kelpie-agent -now")
	secs, frac, ok := strings.Cut(out, ".")
	s, err := strconv.ParseInt(secs, 10, 64)
	if !ok || len(frac) != 9 || err != nil {
		t.Fatalf("kelpie-agent -now printed %q, want SECONDS.NANOSECONDS", out)
	}
	if d := time.Since(time.Unix(s, 0)); d < -2*time.Second || d > 2*time.Second {
		t.Fatalf("kelpie-agent -now = %q, %v from the host", out, d)
	}

	if err := src.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	if err := src.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	checkClock(t, "after a 2 s pause", guestTime(t, ctx, src))

	st, err := fs.Open(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	before := guestTime(t, ctx, src)
	pkg, err := newService(st, fa).Out(ctx, src, service.OutRequest{AgentID: "clock", Kind: teleport.KindTeleport})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(30 * time.Second) // the package waits in the store
	dst, _, err := newService(st, fb).In(ctx, pkg.ID, vm.Config{Name: "clock"}, service.InOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Destroy(context.Background())
	after := guestTime(t, ctx, dst)
	checkClock(t, "after 30 s in the store", after)
	if after.Monotonic < before.Monotonic {
		t.Fatalf("the guest's monotonic clock went back: %v before the teleport, %v after", before.Monotonic, after.Monotonic)
	}
	// It stood still while the VM was away (not 30 s later).
	if d := after.Monotonic - before.Monotonic; d > 10*time.Second {
		t.Errorf("the monotonic clock moved %v across the teleport", d)
	}
	again := guestTime(t, ctx, dst)
	if again.Monotonic <= after.Monotonic || again.Realtime.Before(after.Realtime) {
		t.Fatalf("guest clocks went back within the restored guest: %+v then %+v", after, again)
	}
	// The guest keeps time on the TSC: a clocksource watchdog that
	// demoted it to jiffies on a busy host would let the clock fall behind
	// between resumes (tsc=reliable, image.KernelCmdline).
	if cs := mustShell(t, ctx, dst, "cat /sys/devices/system/clocksource/clocksource0/current_clocksource"); cs != "tsc" && cs != "tsc-early" {
		t.Fatalf("the guest's clocksource is %s", cs)
	}
}
