package host

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"

	"github.com/kelpie/teleport/vm"
)

// ForkCountMax bounds one fork: each copy is a whole VM.
const ForkCountMax = 64

// ForkRequest says how many copies ForkVM makes and how they are named.
type ForkRequest struct {
	Count int
	// Prefix names the copies Prefix1..PrefixN (default "NAME-").
	Prefix string
	// Publish are each copy's published ports (default none); a fixed
	// host port serves one copy only, so with several copies use host
	// port 0.
	Publish []vm.Publish
}

// ForkResult lists the copies, in order.
type ForkResult struct {
	VMs []VMInfo
}

// ForkNames checks req and names its copies of VM name, in order:
// PREFIX1..PREFIXN (default prefix NAME-).
func ForkNames(name string, req ForkRequest) ([]string, error) {
	if req.Count < 1 || req.Count > ForkCountMax {
		return nil, fmt.Errorf("fork count %d: want 1..%d: %w", req.Count, ForkCountMax, vm.ErrInvalidConfig)
	}
	if req.Prefix == "" {
		req.Prefix = name + "-"
	}
	for _, p := range req.Publish {
		if p.HostPort != 0 && req.Count > 1 {
			return nil, fmt.Errorf("published port %s: a fixed host port can serve one copy, and this fork makes %d (use host port 0): %w", p, req.Count, vm.ErrInvalidConfig)
		}
	}
	names := make([]string, req.Count)
	for i := range names {
		names[i] = req.Prefix + strconv.Itoa(i+1)
		if err := vm.ValidateName(names[i]); err != nil {
			return nil, fmt.Errorf("fork name: %w", err)
		}
	}
	return names, nil
}

// ForkVM captures VM name once and restores Count copies of it on this
// host, each with its own identity: its name as hostname, its name as
// agent id, and its kernel RNG reseeded with fresh entropy before its
// first command. The source keeps running (it pauses for the snapshot).
// Copies keep the source's network mode, MAC, address and forwards (each
// has a network of its own), its workspace disk (each its own copy), and
// get only the published ports asked for. On failure no copy is left, or
// the error names the one that is (vm.ErrLeftBehind).
func (h *Host) ForkVM(ctx context.Context, name string, req ForkRequest) (_ *ForkResult, err error) {
	names, err := ForkNames(name, req)
	if err != nil {
		return nil, err
	}
	unlock, err := h.lockVM(ctx, name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := h.refuseMoved(ctx, name); err != nil {
		return nil, err
	}
	for _, n := range names {
		if n == name {
			return nil, fmt.Errorf("fork %s would take its source's name: %w", n, vm.ErrAlreadyExists)
		}
		u, err := h.lockVM(ctx, n)
		if err != nil {
			return nil, err
		}
		defer u()
		if err := h.nameFree(ctx, n); err != nil {
			return nil, err
		}
	}
	lv, err := h.attach(ctx, name)
	if err != nil {
		return nil, err
	}
	src := lv.inst.Config()
	// Validate every copy's configuration before the source pauses.
	cfgs := make([]vm.Config, len(names))
	for i, n := range names {
		c := vm.Config{Name: n, Hostname: n, AgentID: n, VCPUs: src.VCPUs, MemoryMiB: src.MemoryMiB, Env: src.Env,
			Workdir: src.Workdir, Network: src.Network, MAC: src.MAC, Forwards: src.Forwards, Publish: req.Publish}
		if !c.Network.HasDevice() {
			if len(req.Publish) > 0 {
				return nil, fmt.Errorf("vm %s has no network to publish ports of: %w", name, vm.ErrInvalidConfig)
			}
			c.Network, c.MAC = "", ""
		}
		if err := c.Validate(); err != nil {
			return nil, err
		}
		cfgs[i] = c
	}

	insts, err := h.forkCopies(ctx, lv, cfgs)
	if err != nil {
		return nil, fmt.Errorf("fork vm %s: %w", name, err)
	}
	// The source ran on: it answers, with its clock set, before its next
	// command (that it stood still for the capture is its only trace).
	if lv.inst.State() == vm.StateRunning {
		if err := vm.WaitReady(ctx, lv.inst); err != nil {
			err = fmt.Errorf("fork vm %s: the source does not answer after the capture: %w", name, err)
			return nil, destroyAll(ctx, insts, err)
		}
	}
	res := &ForkResult{}
	for i, inst := range insts {
		res.VMs = append(res.VMs, h.describe(ctx, h.keep(names[i], inst, lv.f)))
	}
	return res, nil
}

// forkCopies makes the copies, running, answering, each with its new
// identity: from one capture of the source where its backend can clone
// (vm.Cloner), else from one snapshot restored once per copy. The copies
// start side by side.
func (h *Host) forkCopies(ctx context.Context, lv *liveVM, cfgs []vm.Config) ([]vm.Instance, error) {
	insts := make([]vm.Instance, len(cfgs))
	errs := make([]error, len(cfgs))
	var wg sync.WaitGroup
	if cl, ok := lv.inst.(vm.Cloner); ok {
		// Each copy starts the moment it is restored.
		return cl.Clone(ctx, cfgs, func(ctx context.Context, i int, inst vm.Instance) error {
			return startCopy(ctx, lv.f, inst, cfgs[i].Name)
		})
	} else {
		snap, err := lv.inst.Snapshot(ctx)
		if err != nil {
			return nil, fmt.Errorf("snapshot: %w", err)
		}
		defer snap.Close()
		for i := range cfgs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				inst, err := lv.f.CreateFromSnapshot(ctx, cfgs[i], snap)
				if err != nil {
					errs[i] = fmt.Errorf("restore %s: %w", cfgs[i].Name, err)
					return
				}
				insts[i], errs[i] = inst, startCopy(ctx, lv.f, inst, cfgs[i].Name)
			}()
		}
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, destroyAll(ctx, insts, err)
	}
	return insts, nil
}

// startCopy resumes a restored copy, waits for its guest and gives it its
// identity.
func startCopy(ctx context.Context, f vm.Factory, inst vm.Instance, name string) error {
	if err := inst.Resume(ctx); err != nil {
		return fmt.Errorf("resume %s: %w", name, err)
	}
	if err := vm.WaitReady(ctx, inst); err != nil {
		return fmt.Errorf("%s does not answer: %w", name, err)
	}
	if err := vm.Reidentify(ctx, f, inst, vm.Identity{Hostname: name, Entropy: freshEntropy()}); err != nil {
		return fmt.Errorf("give %s its own identity: %w", name, err)
	}
	return nil
}

// destroyAll removes the copies made so far of a fork that failed with
// err: none stays, or the error names the one that does.
func destroyAll(ctx context.Context, insts []vm.Instance, err error) error {
	for _, inst := range insts {
		if inst == nil {
			continue
		}
		if derr := inst.Destroy(context.WithoutCancel(ctx)); derr != nil {
			err = fmt.Errorf("%w; removing fork %s failed too (%v): %w", err, inst.ID(), derr, vm.ErrLeftBehind)
		}
	}
	return err
}
