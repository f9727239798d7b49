package vm

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"io"
	"os"
)

// Layout says how a snapshot fills the blob's sections.
type Layout string

// Snapshot layouts.
const (
	// LayoutSingle: one file, the snapshot section only (Apple VZ, a QEMU
	// migration stream with RAM inside).
	LayoutSingle Layout = "single"
	// LayoutSplit: device state in the snapshot section, guest RAM in the
	// memory section (Firecracker, QEMU with a file-backed RAM).
	LayoutSplit Layout = "split"
	// LayoutNone: no VM payload at all (an application checkpoint).
	LayoutNone Layout = "none"
)

// SnapshotMetadata describes a snapshot. The first nine fields are Kelpie's
// KLP1 metadata and keep their JSON names so that blobs written by Kelpie
// decode here; the rest are this project's additions (omitted when empty).
type SnapshotMetadata struct {
	SnapshotID     string       `json:"snapshot_id"`
	VMID           string       `json:"vm_id"`
	CreatedAtMs    int64        `json:"created_at_ms"`
	SizeBytes      uint64       `json:"size_bytes"`
	Checksum       uint32       `json:"checksum"`
	Architecture   Architecture `json:"architecture"`
	VCPUCount      int          `json:"vcpu_count"`
	MemoryMiB      int          `json:"memory_mib"`
	IsFullSnapshot bool         `json:"is_full_snapshot"`

	Backend          string `json:"backend,omitempty"`
	BackendVersion   string `json:"backend_version,omitempty"`
	HostID           string `json:"host_id,omitempty"`
	Layout           Layout `json:"layout,omitempty"`
	BaseImageVersion string `json:"base_image_version,omitempty"`
	// SHA-256 (hex) and size of each payload section.
	DeviceStateSHA256 string `json:"snapshot_sha256,omitempty"`
	DeviceStateSize   int64  `json:"snapshot_size,omitempty"`
	MemorySHA256      string `json:"memory_sha256,omitempty"`
	MemorySize        int64  `json:"memory_size,omitempty"`
	// Compat holds backend facts a restoring host must match exactly
	// (see HostInfo.Compat). Keys are sorted when encoded.
	Compat map[string]string `json:"compat,omitempty"`
	// HostBound: the payload restores only on the host that wrote it
	// (Apple VZ save files are encrypted with a host key).
	HostBound bool `json:"host_bound,omitempty"`
	// Network is the VM's network device and ports, which a restore
	// recreates; nil without a network.
	Network *Network `json:"network,omitempty"`
	// Disk is the workspace disk the snapshot's disk payload carries,
	// captured at the same instant as memory; nil without a disk.
	Disk *DiskMetadata `json:"disk,omitempty"`
	// Hostname is the guest's hostname at the snapshot.
	Hostname string `json:"hostname,omitempty"`
	// MemoryFormat says what the memory payload holds: "" the backend's
	// own encoding, MemoryFormatImage the raw guest RAM.
	MemoryFormat string `json:"memory_format,omitempty"`
}

// DiskPayloadSize and DiskSHA256 are the disk payload's recorded size and
// checksum (0 and "" without a disk).
func (m SnapshotMetadata) DiskPayloadSize() int64 {
	if m.Disk == nil {
		return 0
	}
	return m.Disk.PayloadBytes
}

// DiskSHA256: see DiskPayloadSize.
func (m SnapshotMetadata) DiskSHA256() string {
	if m.Disk == nil {
		return ""
	}
	return m.Disk.SHA256
}

// MemoryFormatImage: the memory payload is the guest RAM as a raw image
// of MemorySize bytes, zero where the guest holds nothing. A backend that
// hands out such an image (ImageSnapshotter) may leave its checksum out:
// only a packer that verifies it chunk by chunk (KLP1 version 2) takes it,
// and on restore it arrives as an ImagePayload.
const MemoryFormatImage = "image"

// metadataMaxBytes bounds the metadata section we are willing to parse.
const metadataMaxBytes = 1 << 20

// Marshal encodes the metadata as the KLP1 metadata section.
func (m SnapshotMetadata) Marshal() ([]byte, error) {
	return json.Marshal(m)
}

// ParseMetadata decodes a metadata section read from r, reading at most
// 1 MiB whatever the blob claims.
func ParseMetadata(r io.Reader) (SnapshotMetadata, error) {
	var m SnapshotMetadata
	b, err := io.ReadAll(io.LimitReader(r, metadataMaxBytes+1))
	if err != nil {
		return m, fmt.Errorf("read snapshot metadata: %w", err)
	}
	if len(b) > metadataMaxBytes {
		return m, fmt.Errorf("snapshot metadata larger than %d bytes: %w", metadataMaxBytes, ErrCorrupt)
	}
	if len(bytes.TrimSpace(b)) == 0 {
		return m, fmt.Errorf("snapshot metadata is empty: %w", ErrCorrupt)
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("snapshot metadata is not valid JSON (%v): %w", err, ErrCorrupt)
	}
	return m, nil
}

// FilePayload is a payload backed by a whole file.
type FilePayload struct {
	Path string
	size int64
}

// NewFilePayload stats path and returns a payload for it.
func NewFilePayload(path string) (*FilePayload, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	return &FilePayload{Path: path, size: fi.Size()}, nil
}

// Size is the file's size when the payload was made.
func (p *FilePayload) Size() int64 { return p.size }

// Open opens the file for reading.
func (p *FilePayload) Open() (io.ReadCloser, error) { return os.Open(p.Path) }

// SectionPayload is a payload backed by a byte range of a ReaderAt, such as
// one section of a blob in a package store.
type SectionPayload struct {
	R      io.ReaderAt
	Offset int64
	N      int64
}

// Size is the section length.
func (p *SectionPayload) Size() int64 { return p.N }

// Open returns a reader over the section.
func (p *SectionPayload) Open() (io.ReadCloser, error) {
	return io.NopCloser(io.NewSectionReader(p.R, p.Offset, p.N)), nil
}

// BytesPayload is a payload held in memory; for small sections and the
// simulation only.
type BytesPayload []byte

// Size is len(p).
func (p BytesPayload) Size() int64 { return int64(len(p)) }

// Open returns a reader over p.
func (p BytesPayload) Open() (io.ReadCloser, error) {
	return io.NopCloser(bytes.NewReader(p)), nil
}

// FileDigest is what a snapshot records of one payload file.
type FileDigest struct {
	Size   int64
	SHA256 string // hex
	CRC32C uint32 // Kelpie's checksum field (of the device state)
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// HashFile reads a file once and returns its size, SHA-256 and CRC-32C.
func HashFile(path string) (FileDigest, error) {
	f, err := os.Open(path)
	if err != nil {
		return FileDigest{}, err
	}
	defer f.Close()
	sh, cr := sha256.New(), crc32.New(castagnoli)
	n, err := io.Copy(io.MultiWriter(sh, cr), f)
	if err != nil {
		return FileDigest{}, err
	}
	return FileDigest{Size: n, SHA256: hex.EncodeToString(sh.Sum(nil)), CRC32C: cr.Sum32()}, nil
}

// HashPayload returns the SHA-256 (hex) of a payload, streaming it.
func HashPayload(p Payload) (string, error) {
	h := sha256.New()
	if p != nil {
		rc, err := p.Open()
		if err != nil {
			return "", err
		}
		defer rc.Close()
		n, err := io.Copy(h, rc)
		if err != nil {
			return "", err
		}
		if n != p.Size() {
			return "", fmt.Errorf("payload has %d bytes, expected %d: %w", n, p.Size(), ErrCorrupt)
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
