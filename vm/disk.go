package vm

import "fmt"

// Workspace disk limits. The floor leaves room for ext4's journal and
// metadata; the ceiling catches a size in bytes given as MiB.
const (
	DiskBytesMin = 32 << 20
	DiskBytesMax = 16 << 40
	// DiskFilesystemExt4 is the one workspace filesystem.
	DiskFilesystemExt4 = "ext4"
)

// Disk is a VM's workspace disk: a block device with a filesystem,
// mounted at /workspace in the guest. The zero value is no disk.
type Disk struct {
	SizeBytes int64 `json:"size_bytes,omitempty"`
	// Filesystem is ext4 (the default).
	Filesystem string `json:"filesystem,omitempty"`
}

// Present says whether the VM has a workspace disk.
func (d Disk) Present() bool { return d.SizeBytes != 0 }

// Validate checks a disk's size and filesystem.
func (d Disk) Validate() error {
	if !d.Present() {
		if d.Filesystem != "" {
			return fmt.Errorf("disk filesystem %q without a disk size: %w", d.Filesystem, ErrInvalidConfig)
		}
		return nil
	}
	if d.SizeBytes < DiskBytesMin || d.SizeBytes > DiskBytesMax || d.SizeBytes%(1<<20) != 0 {
		return fmt.Errorf("disk size %d bytes: want whole MiB, %d MiB..%d TiB: %w", d.SizeBytes, DiskBytesMin>>20, DiskBytesMax>>40, ErrInvalidConfig)
	}
	if d.Filesystem != "" && d.Filesystem != DiskFilesystemExt4 {
		return fmt.Errorf("disk filesystem %q (want %s): %w", d.Filesystem, DiskFilesystemExt4, ErrInvalidConfig)
	}
	return nil
}

// DiskMetadata is what a snapshot or package records of a workspace disk:
// the disk itself (size, filesystem) and the payload that carries its
// allocated blocks (its encoding, size and SHA-256).
type DiskMetadata struct {
	SizeBytes  int64  `json:"size_bytes"`
	Filesystem string `json:"filesystem"`
	// Format names the payload's encoding of the disk's blocks.
	Format       string `json:"format"`
	PayloadBytes int64  `json:"payload_bytes"`
	SHA256       string `json:"sha256"`
}

// DiskFormatImage: the disk payload is the disk as a raw image of
// SizeBytes, zero where nothing is allocated, with no checksum of its own.
// Such a disk travels inside a KLP1 version 2 blob, as a page map of
// chunks that each carry their own hash (like a raw memory image, see
// MemoryFormatImage), and arrives on restore as an ImagePayload.
const DiskFormatImage = "image"

// InBlob says whether the disk travels inside the snapshot's KLP1 blob
// (a raw image in a version 2 blob) rather than in a package section of
// its own.
func (m *DiskMetadata) InBlob() bool { return m != nil && m.Format == DiskFormatImage }

// Disk is the disk configuration this metadata describes.
func (m *DiskMetadata) Disk() Disk {
	if m == nil {
		return Disk{}
	}
	return Disk{SizeBytes: m.SizeBytes, Filesystem: m.Filesystem}
}

// DiskImage is a workspace disk's blocks as a payload, with its metadata:
// what a checkpoint carries, and what a fresh VM is created with.
type DiskImage struct {
	Metadata DiskMetadata
	Payload  Payload
	release  releaser
}

// NewDiskImage builds a disk image whose Close calls release (may be nil).
func NewDiskImage(md DiskMetadata, p Payload, release func() error) *DiskImage {
	return &DiskImage{Metadata: md, Payload: p, release: releaser{release}}
}

// Close releases whatever backs the payload. It is safe to call twice.
func (d *DiskImage) Close() error {
	if d == nil {
		return nil
	}
	return d.release.run()
}
