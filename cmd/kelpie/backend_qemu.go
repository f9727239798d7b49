package main

import (
	"context"
	"fmt"

	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/qemu"
)

func init() {
	backends["qemu"] = func(ctx context.Context, e *env, hostID string) (vm.Factory, error) {
		return newQEMUFactory(ctx, e, hostID, "")
	}
}

// newQEMUFactory opens the QEMU backend of this home. accel "" means
// $KELPIE_ACCEL, else auto (KVM where a cached probe says it runs guests).
func newQEMUFactory(ctx context.Context, e *env, hostID, accel string) (*qemu.Factory, error) {
	if accel == "" {
		accel = e.getenv("KELPIE_ACCEL")
	}
	a, err := qemu.ParseAccel(accel)
	if err != nil {
		return nil, usagef("%v", err)
	}
	layout := vm.Layout(e.getenv("KELPIE_QEMU_LAYOUT"))
	f, err := qemu.NewFactory(ctx, qemu.Options{Home: home(e), HostID: hostID, Accel: a, Layout: layout,
		ImageDir: e.getenv("KELPIE_IMAGE_DIR")})
	if err != nil {
		return nil, err
	}
	return f, nil
}

// qemuFactory opens the QEMU backend with this home's host id.
func qemuFactory(ctx context.Context, e *env, accel string) (*qemu.Factory, error) {
	id, err := hostID(e)
	if err != nil {
		return nil, err
	}
	return newQEMUFactory(ctx, e, id, accel)
}

// qemuForExisting opens the backend to drive VMs that already exist: they
// run under the accelerator they were created with, so no KVM probe is
// needed for that.
func qemuForExisting(ctx context.Context, e *env) (*qemu.Factory, error) {
	return qemuFactory(ctx, e, string(qemu.AccelTCG))
}

// openVM finds a VM of this home by name.
func openVM(ctx context.Context, e *env, name string) (*qemu.Factory, *qemu.Instance, error) {
	f, err := qemuForExisting(ctx, e)
	if err != nil {
		return nil, nil, err
	}
	inst, err := f.Open(ctx, name)
	if err != nil {
		return nil, nil, err
	}
	return f, inst, nil
}

// sayAccel tells the user which accelerator a factory chose and why.
func sayAccel(e *env, f *qemu.Factory) {
	a, why := f.Accel()
	fmt.Fprintf(e.stderr, "kelpie: accelerator %s (%s)\n", a, why)
}
