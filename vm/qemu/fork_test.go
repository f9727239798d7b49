package qemu

import (
	"context"
	"crypto/rand"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/store/fs"
	"github.com/kelpie/teleport/vm"
)

// A Linux 6.1 guest reseeds its CRNG from its input pool (where each copy
// of a snapshot mixes its own interrupt timings) every uptime/2 seconds in
// its first two minutes, then every minute. Copies of a snapshot taken
// right after a reseed share the CRNG until the next one: seedQuietSeconds
// of uptime give the copies of this test at least half that long.
const seedQuietSeconds = 20

func guestUptime(t *testing.T, ctx context.Context, inst vm.Instance) float64 {
	t.Helper()
	f, _, _ := strings.Cut(mustShell(t, ctx, inst, "cat /proc/uptime"), " ")
	u, err := strconv.ParseFloat(f, 64)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// Copies of one snapshot share their kernel's random number generator:
// two restored without a new identity read the same bytes from
// /dev/urandom. With one (Reidentify: RNDADDENTROPY, then RNDRESEEDCRNG)
// they do not, and they have their own hostnames.
func TestForkRandomness(t *testing.T) {
	// Mostly waiting (for the store, for the guest's uptime): it runs
	// beside the other waiting test.
	t.Parallel()
	ctx := testCtx(t, 3*time.Minute)
	f := newTestFactory(t, "host-a")
	src := bootVM(t, ctx, f, testConfig("src", 256))
	if u := guestUptime(t, ctx, src); u < seedQuietSeconds {
		time.Sleep(time.Duration((seedQuietSeconds - u) * float64(time.Second)))
	}
	// Reseed now (the source's own identity), so the copies' next
	// scheduled reseed is seconds away: until then only an injected one
	// tells them apart.
	e := make([]byte, 64)
	rand.Read(e)
	if err := src.Reidentify(ctx, vm.Identity{Hostname: "src", Entropy: e}); err != nil {
		t.Fatal(err)
	}
	snap, err := src.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Close()
	// 256 reads of 32 bytes each, one line each. Every read (and every
	// refill of the kernel's own batches, whose number depends on timing)
	// takes the next step of the CRNG's key chain: copies that share the
	// chain read some of the same blocks, copies that do not share none.
	const read = "dd if=/dev/urandom bs=32 count=256 2>/dev/null | od -An -tx1 -v -w32 | tr -d ' '"
	restore := func(names []string, identity bool) []map[string]bool {
		out := make([]map[string]bool, len(names))
		var wg sync.WaitGroup
		for i, name := range names {
			wg.Add(1)
			go func() {
				defer wg.Done()
				inst, err := f.CreateFromSnapshot(ctx, vm.Config{Name: name}, snap)
				if err != nil {
					t.Error(err)
					return
				}
				t.Cleanup(func() { inst.Destroy(context.Background()) })
				if err := inst.Resume(ctx); err != nil {
					t.Error(err)
					return
				}
				if identity {
					e := make([]byte, 64)
					rand.Read(e)
					if err := vm.Reidentify(ctx, f, inst, vm.Identity{Hostname: name, Entropy: e}); err != nil {
						t.Error(err)
						return
					}
					if hn, _ := shell(ctx, inst, "hostname"); hn != name {
						t.Errorf("copy %s has hostname %q", name, hn)
					}
				}
				lines, err := shell(ctx, inst, read)
				if err != nil {
					t.Error(err)
					return
				}
				out[i] = map[string]bool{}
				for _, l := range strings.Fields(lines) {
					out[i][l] = true
				}
				if len(out[i]) != 256 {
					t.Errorf("copy %s read %d distinct blocks of 256", name, len(out[i]))
				}
			}()
		}
		wg.Wait()
		return out
	}
	common := func(a, b map[string]bool) int {
		n := 0
		for k := range a {
			if b[k] {
				n++
			}
		}
		return n
	}
	plain := restore([]string{"plain-1", "plain-2"}, false)
	if t.Failed() {
		t.FailNow()
	}
	shared := common(plain[0], plain[1])
	t.Logf("copies without a new identity read %d of 256 blocks alike", shared)
	if shared == 0 {
		t.Fatal("copies without a new identity share no block: the guest kernel reseeded by itself, and this test cannot tell the reseed's effect")
	}
	forks := restore([]string{"fork-1", "fork-2"}, true)
	if t.Failed() {
		t.FailNow()
	}
	for _, pair := range [][2]map[string]bool{{forks[0], forks[1]}, {forks[0], plain[0]}, {forks[1], plain[0]}, {forks[0], plain[1]}, {forks[1], plain[1]}} {
		if n := common(pair[0], pair[1]); n != 0 {
			t.Fatalf("a copy with a new identity read %d blocks another copy read too", n)
		}
	}
}

// Clone restores copies of a running VM from one capture: each continues
// the source's processes with its own copy-on-write RAM and its own copy
// of the disk, isolated from the source and each other, and a copy can be
// teleported on (its RAM comes out of the migration stream).
func TestClone(t *testing.T) {
	ctx := testCtx(t, 4*time.Minute)
	fa, fb := newTestFactory(t, "host-a"), newTestFactory(t, "host-b")
	src := bootVM(t, ctx, fa, diskConfig("src"))
	counter := startCounter(t, ctx, src)
	mustShell(t, ctx, src, "echo source > /tmp/who; echo source > /workspace/who")
	files := workspaceFiles{}
	files.write(t, ctx, src, "data", 512<<10)
	before := counter.read(t, ctx, src)
	var started []string
	var mu sync.Mutex
	copies, err := src.Clone(ctx, []vm.Config{{Name: "c1"}, {Name: "c2"}}, func(ctx context.Context, i int, c vm.Instance) error {
		mu.Lock()
		started = append(started, c.ID())
		mu.Unlock()
		if c.State() != vm.StatePaused {
			t.Errorf("copy %s handed over %s, want paused", c.ID(), c.State())
		}
		return c.Resume(ctx)
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range copies {
		t.Cleanup(func() { c.Destroy(context.Background()) })
	}
	if len(started) != 2 || src.State() != vm.StateRunning {
		t.Fatalf("started %v; source %s", started, src.State())
	}
	for _, c := range copies {
		counter.checkContinues(t, ctx, c, before)
		if !c.(*Instance).privateRAM() {
			t.Fatalf("copy %s has its own RAM file: the capture was copied, not mapped", c.ID())
		}
		files.check(t, ctx, c)
		mustShell(t, ctx, c, "echo "+c.ID()+" > /tmp/who; echo "+c.ID()+" > /workspace/who; sync")
	}
	for _, inst := range []vm.Instance{src, copies[0], copies[1]} {
		want := inst.ID()
		if inst == src {
			want = "source"
		}
		if got := mustShell(t, ctx, inst, "cat /tmp/who /workspace/who"); got != want+"\n"+want {
			t.Fatalf("%s sees %q: copies share memory or disk", inst.ID(), got)
		}
	}
	// A paused source clones too, and stays paused.
	beforePause := counter.read(t, ctx, src)
	if err := src.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	c3, err := src.Clone(ctx, []vm.Config{{Name: "c3"}}, func(ctx context.Context, i int, c vm.Instance) error { return c.Resume(ctx) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c3[0].Destroy(context.Background()) })
	if src.State() != vm.StatePaused {
		t.Fatalf("the paused source is %s after a clone", src.State())
	}
	if err := src.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	counter.checkContinues(t, ctx, c3[0], beforePause)
	if got := mustShell(t, ctx, c3[0], "cat /tmp/who"); got != "source" {
		t.Fatalf("the copy of the paused source sees %q", got)
	}

	// The copy moves on: its RAM is read from the stream.
	st, err := fs.Open(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	mid := counter.read(t, ctx, copies[0])
	pkg, err := newService(st, fa).Out(ctx, copies[0], service.OutRequest{AgentID: "c1", Kind: teleport.KindTeleport})
	if err != nil {
		t.Fatal(err)
	}
	moved, _, err := newService(st, fb).In(ctx, pkg.ID, vm.Config{Name: "c1"}, service.InOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer moved.Destroy(context.Background())
	counter.checkContinues(t, ctx, moved, mid)
	if got := mustShell(t, ctx, moved, "cat /tmp/who /workspace/who"); got != "c1\nc1" {
		t.Fatalf("the moved copy sees %q", got)
	}
	files.check(t, ctx, moved)
}
