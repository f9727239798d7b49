package qemu

// The workspace disk: a sparse raw image in the instance directory with an
// ext4 filesystem, a virtio-blk device the guest mounts at /workspace. A
// snapshot captures it while the guest is stopped (QEMU has drained and
// flushed the device's requests by then), at the same instant as memory;
// its payload is the image in the memory section's sparse format, so only
// allocated, non-zero blocks travel. A restore decodes it into the new
// instance directory, verified, before QEMU starts.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/kelpie/teleport/vm"
)

const (
	diskFile = "disk.img" // in the instance directory
	// diskDriveID and guestDiskDev name the drive in QEMU and the block
	// device the guest's rcS mounts (kelpie.disk=).
	diskDriveID  = "ws"
	guestDiskDev = "vda"
	mkfsBinary   = "mkfs.ext4"
	// guestWorkspace is where the guest mounts the disk.
	guestWorkspace = WorkspaceDir
	mkfsTimeout    = time.Minute
)

func (v *Instance) diskPath() string { return v.path(diskFile) }

func (v *Instance) hasDisk() bool { return v.rec.Config.Disk.Present() }

// mkfsPath finds mkfs.ext4, also where a non-root PATH leaves it out.
func mkfsPath() (string, error) {
	if p, err := exec.LookPath(mkfsBinary); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin"} {
		if p := filepath.Join(dir, mkfsBinary); exec.Command(p, "-V").Run() == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found (apt-get install e2fsprogs)", mkfsBinary)
}

// checkDiskTools refuses a disk this host cannot make.
func checkDiskTools(cfg vm.Config) error {
	if !cfg.Disk.Present() {
		return nil
	}
	if _, err := mkfsPath(); err != nil {
		return fmt.Errorf("vm %s: a workspace disk: %v: %w", cfg.Name, err, vm.ErrUnavailable)
	}
	return nil
}

// createDisk makes a new sparse image of d's size with an ext4 filesystem.
// The inode tables and journal are initialised by mkfs (zeroed by
// punching holes, which keeps the image sparse), so the guest kernel has
// no lazy initialisation to do: nothing dirties blocks after boot.
func createDisk(ctx context.Context, path string, d vm.Disk) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	err = f.Truncate(d.SizeBytes)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("create workspace disk: %w", err)
	}
	mkfs, err := mkfsPath()
	if err != nil {
		os.Remove(path)
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, mkfsTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, mkfs, "-q", "-F", "-L", "workspace", "-m", "0",
		"-E", "lazy_itable_init=0,lazy_journal_init=0", path).CombinedOutput()
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("%s %s: %v: %s", mkfsBinary, path, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// diskPayload encodes the image at src (the VM's disk, or a copy taken
// while the guest was stopped) into the file out and describes it.
func diskPayload(src, out string, d vm.Disk) (*vm.DiskMetadata, vm.Payload, error) {
	in, err := os.Open(src)
	if err != nil {
		return nil, nil, err
	}
	defer in.Close()
	f, err := os.OpenFile(out, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, nil, err
	}
	h := vm.NewAsyncHash(sha256.New())
	n, err := encodeMemory(io.MultiWriter(f, h), in, d.SizeBytes)
	sum := hex.EncodeToString(h.Sum())
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, nil, fmt.Errorf("encode workspace disk: %w", err)
	}
	p, err := vm.NewFilePayload(out)
	if err != nil {
		return nil, nil, err
	}
	fs := d.Filesystem
	if fs == "" {
		fs = vm.DiskFilesystemExt4
	}
	return &vm.DiskMetadata{SizeBytes: d.SizeBytes, Filesystem: fs, Format: memFormat, PayloadBytes: n, SHA256: sum}, p, nil
}

// diskImage describes the image at src (the VM's disk, or a copy taken
// while the guest was stopped) as a raw disk image payload
// (vm.DiskFormatImage), read in place.
func diskImage(src string, d vm.Disk) (*vm.DiskMetadata, vm.Payload, error) {
	p, err := vm.NewFilePayload(src)
	if err != nil {
		return nil, nil, err
	}
	if p.Size() != d.SizeBytes {
		return nil, nil, fmt.Errorf("workspace disk image %s has %d bytes, the VM's disk %d", src, p.Size(), d.SizeBytes)
	}
	fs := d.Filesystem
	if fs == "" {
		fs = vm.DiskFilesystemExt4
	}
	return &vm.DiskMetadata{SizeBytes: d.SizeBytes, Filesystem: fs, Format: vm.DiskFormatImage, PayloadBytes: d.SizeBytes}, p, nil
}

// copyDisk copies the VM's disk image sparse into dst (a new file), for a
// guest that runs on after the capture.
func (v *Instance) copyDisk(dst string) error {
	src, err := os.Open(v.diskPath())
	if err != nil {
		return err
	}
	defer src.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	if err := out.Truncate(v.rec.Config.Disk.SizeBytes); err != nil {
		out.Close()
		return err
	}
	_, err = copySparse(out, src, v.rec.Config.Disk.SizeBytes)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}

// diskSink stages a disk payload into a new image at path (decoding the
// sparse format, or writing a raw image's pages at their offsets); what an
// instance's staged disk becomes when vm.Stage* verified it.
func diskSink(path string, md *vm.DiskMetadata) *vm.DiskTarget {
	if md == nil {
		return nil
	}
	return &vm.DiskTarget{Path: path, Stream: func(r io.Reader) error {
		if md.Format != memFormat {
			return fmt.Errorf("disk payload format %q (this backend reads %s): %w", md.Format, memFormat, vm.ErrIncompatible)
		}
		f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_RDWR, 0o600)
		if err != nil {
			return err
		}
		err = decodeSparse(f, r, md.SizeBytes, vm.SectionDisk)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		return err
	}}
}

// checkDiskConfig makes cfg's disk the one md describes (filling it in
// when cfg has none) and refuses a different one.
func checkDiskConfig(cfg *vm.Config, md *vm.DiskMetadata) error {
	want := md.Disk()
	if want.Present() && want.Filesystem == "" {
		want.Filesystem = vm.DiskFilesystemExt4
	}
	got := cfg.Disk
	if got.Present() && got.Filesystem == "" {
		got.Filesystem = vm.DiskFilesystemExt4
	}
	switch {
	case !got.Present():
		cfg.Disk = want
	case got != want:
		return fmt.Errorf("vm %s: configured with a %d MiB %s disk, the image is a %d MiB %s disk: %w", cfg.Name,
			got.SizeBytes>>20, got.Filesystem, want.SizeBytes>>20, orDash(want.Filesystem), vm.ErrIncompatible)
	}
	return nil
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// ExportDisk hands out a consistent image of the running guest's
// workspace disk (vm.DiskExporter): the filesystem is frozen (its journal
// flushed, the guest's writers held) while the image is copied, and
// thawed at once. A VM without a disk returns nil.
func (v *Instance) ExportDisk(ctx context.Context) (_ *vm.DiskImage, err error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if !v.hasDisk() {
		return nil, nil
	}
	if err := v.check(ctx, vm.OpExec); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(v.f.tmpDir(), 0o755); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(v.f.tmpDir(), snapDirPrefix(os.Getpid()))
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(dir)
		}
	}()
	if err := v.guestShell(ctx, "sync && fsfreeze --freeze "+guestWorkspace); err != nil {
		return nil, fmt.Errorf("freeze the workspace: %w", err)
	}
	raw := filepath.Join(dir, "disk.raw")
	cerr := v.copyDisk(raw)
	// Thaw whatever happened, even when ctx ended.
	tctx, cancel := vm.SettleContext(ctx)
	terr := v.guestShell(tctx, "fsfreeze --unfreeze "+guestWorkspace)
	cancel()
	if err := errors.Join(cerr, terr); err != nil {
		return nil, fmt.Errorf("copy the workspace disk: %w", err)
	}
	md, p, err := diskPayload(raw, filepath.Join(dir, "disk"), v.rec.Config.Disk)
	os.Remove(raw)
	if err != nil {
		return nil, err
	}
	return vm.NewDiskImage(*md, p, func() error { return os.RemoveAll(dir) }), nil
}

// CreateWithDisk makes a VM (state Created) whose workspace disk is img,
// decoded and verified against its metadata before anything starts
// (vm.DiskCreator).
func (f *Factory) CreateWithDisk(ctx context.Context, cfg vm.Config, img *vm.DiskImage) (vm.Instance, error) {
	if img == nil {
		return nil, fmt.Errorf("vm %s: no disk image: %w", cfg.Name, vm.ErrInvalidConfig)
	}
	if err := checkDiskConfig(&cfg, &img.Metadata); err != nil {
		return nil, err
	}
	v, err := f.createInstance(ctx, cfg, false, false)
	if err != nil {
		return nil, err
	}
	if err := vm.StageDisk(ctx, "the disk of vm "+cfg.Name, img.Payload, &img.Metadata, diskSink(v.diskPath(), &img.Metadata)); err != nil {
		if derr := v.Destroy(context.WithoutCancel(ctx)); derr != nil {
			return nil, fmt.Errorf("vm %s: workspace disk: %w; removing the VM failed too (%v): %w", cfg.Name, err, derr, vm.ErrLeftBehind)
		}
		return nil, fmt.Errorf("vm %s: workspace disk: %w", cfg.Name, err)
	}
	return v, nil
}
