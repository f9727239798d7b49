package s3

import (
	"bytes"
	"crypto/md5"
	"encoding/hex"
	"encoding/xml"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeS3 is a small in-process S3 server (path style, no auth) for unit
// tests of the store's logic and fault handling. Verification against a
// real server is the integration tests' job (integration_test.go).
type fakeS3 struct {
	t  testing.TB
	mu sync.Mutex

	objects map[string]fakeObject // "bucket/key"
	uploads map[string]*fakeUpload
	nextID  int
	now     time.Time // Last-Modified stamp; tests move it
	page    int       // list page size

	minPart int // EntityTooSmall below this, for every part but the last

	// ignoreIfNoneMatch makes PUT overwrite whatever If-None-Match says,
	// as some S3-compatible servers do.
	ignoreIfNoneMatch bool

	// fault, when set, may change how a request is answered.
	fault func(r *http.Request, kind string) faultAction
	reqs  map[string]int // "METHOD kind" counts
	log   []string       // "METHOD key" of every request, in order
}

// faultAction: answer with an S3 error instead (status, code); or send half
// a GET's body and drop the connection (cut); or carry the request out and
// answer 500 as if the reply was lost (lose).
type faultAction struct {
	status int
	code   string
	cut    bool
	lose   bool
}

type fakeObject struct {
	data []byte
	mod  time.Time
}

type fakeUpload struct {
	key      string
	parts    map[int][]byte
	initated time.Time
}

func newFakeS3(t testing.TB) (*fakeS3, *httptest.Server) {
	f := &fakeS3{t: t, objects: map[string]fakeObject{}, uploads: map[string]*fakeUpload{},
		now: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC), page: 1000, reqs: map[string]int{}, minPart: partSizeMinBytes}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	return f, srv
}

func (f *fakeS3) advance(d time.Duration) {
	f.mu.Lock()
	f.now = f.now.Add(d)
	f.mu.Unlock()
}

func (f *fakeS3) count(kind string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.reqs[kind]
}

// requests returns the requests so far whose key contains sub.
func (f *fakeS3) requests(sub string) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, r := range f.log {
		if strings.Contains(r, sub) {
			out = append(out, r)
		}
	}
	return out
}

func (f *fakeS3) keys(prefix string) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for k := range f.objects {
		if strings.HasPrefix(k, prefix) {
			out = append(out, k)
		}
	}
	sort.Strings(out)
	return out
}

func (f *fakeS3) openUploads() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.uploads)
}

func s3err(w http.ResponseWriter, status int, code string) {
	w.Header().Set("Content-Type", "application/xml")
	w.WriteHeader(status)
	fmt.Fprintf(w, "<Error><Code>%s</Code><Message>fake: %s</Message></Error>", code, code)
}

func etagOf(b []byte) string {
	s := md5.Sum(b)
	return `"` + hex.EncodeToString(s[:]) + `"`
}

func (f *fakeS3) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	path := strings.TrimPrefix(r.URL.Path, "/")
	bucket, key, _ := strings.Cut(path, "/")
	q := r.URL.Query()
	kind := "object"
	switch {
	case key == "" && q.Has("uploads"):
		kind = "list-uploads"
	case key == "":
		kind = "list"
	case q.Has("uploads"):
		kind = "create-mp"
	case q.Has("partNumber"):
		kind = "part"
	case q.Has("uploadId") && r.Method == http.MethodPost:
		kind = "complete"
	case q.Has("uploadId"):
		kind = "abort"
	}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		return // the client went away mid-body: store nothing
	}
	if int64(len(body)) != r.ContentLength && r.ContentLength >= 0 {
		return
	}
	f.mu.Lock()
	f.reqs[r.Method+" "+kind]++
	f.log = append(f.log, r.Method+" "+key)
	if r.Method == http.MethodPut && r.Header.Get("If-None-Match") != "" {
		f.reqs["PUT conditional"]++
	}
	fault := f.fault
	f.mu.Unlock()
	if fault != nil {
		switch a := fault(r, kind); {
		case a.status != 0:
			s3err(w, a.status, a.code)
			return
		case a.cut:
			f.serveCut(w, r, bucket+"/"+key)
			return
		case a.lose:
			f.serve(httptest.NewRecorder(), r, kind, bucket, key, body)
			s3err(w, 500, "InternalError")
			return
		}
	}
	f.serve(w, r, kind, bucket, key, body)
}

func (f *fakeS3) serve(w http.ResponseWriter, r *http.Request, kind, bucket, key string, body []byte) {
	q := r.URL.Query()
	f.mu.Lock()
	defer f.mu.Unlock()
	full := bucket + "/" + key
	switch kind {
	case "list":
		f.list(w, bucket, q)
	case "list-uploads":
		f.listUploads(w, bucket, q)
	case "create-mp":
		f.nextID++
		id := fmt.Sprintf("up%d", f.nextID)
		f.uploads[id] = &fakeUpload{key: full, parts: map[int][]byte{}, initated: f.now}
		fmt.Fprintf(w, "<InitiateMultipartUploadResult><Bucket>%s</Bucket><Key>%s</Key><UploadId>%s</UploadId></InitiateMultipartUploadResult>", bucket, key, id)
	case "part":
		u := f.uploads[q.Get("uploadId")]
		if u == nil || u.key != full {
			s3err(w, 404, "NoSuchUpload")
			return
		}
		n, _ := strconv.Atoi(q.Get("partNumber"))
		u.parts[n] = body
		w.Header().Set("ETag", etagOf(body))
	case "complete":
		u := f.uploads[q.Get("uploadId")]
		if u == nil || u.key != full {
			s3err(w, 404, "NoSuchUpload")
			return
		}
		var req struct {
			Parts []struct {
				PartNumber int
				ETag       string
			} `xml:"Part"`
		}
		if err := xml.Unmarshal(body, &req); err != nil {
			s3err(w, 400, "MalformedXML")
			return
		}
		var all []byte
		for i, p := range req.Parts {
			data, ok := u.parts[p.PartNumber]
			if !ok || p.ETag != etagOf(data) || (i > 0 && req.Parts[i-1].PartNumber >= p.PartNumber) {
				s3err(w, 400, "InvalidPart")
				return
			}
			if i < len(req.Parts)-1 && len(data) < f.minPart {
				s3err(w, 400, "EntityTooSmall")
				return
			}
			all = append(all, data...)
		}
		delete(f.uploads, q.Get("uploadId"))
		f.objects[full] = fakeObject{data: all, mod: f.now}
		fmt.Fprintf(w, "<CompleteMultipartUploadResult><Key>%s</Key><ETag>\"x-%d\"</ETag></CompleteMultipartUploadResult>", key, len(req.Parts))
	case "abort":
		if _, ok := f.uploads[q.Get("uploadId")]; !ok {
			s3err(w, 404, "NoSuchUpload")
			return
		}
		delete(f.uploads, q.Get("uploadId"))
		w.WriteHeader(204)
	default:
		f.object(w, r, full, body)
	}
}

func (f *fakeS3) object(w http.ResponseWriter, r *http.Request, full string, body []byte) {
	o, exists := f.objects[full]
	switch r.Method {
	case http.MethodPut:
		if r.Header.Get("If-None-Match") == "*" && exists && !f.ignoreIfNoneMatch {
			s3err(w, 412, "PreconditionFailed")
			return
		}
		f.objects[full] = fakeObject{data: body, mod: f.now}
		w.Header().Set("ETag", etagOf(body))
	case http.MethodDelete:
		delete(f.objects, full)
		w.WriteHeader(204)
	case http.MethodHead, http.MethodGet:
		if !exists {
			if r.Method == http.MethodHead {
				w.WriteHeader(404)
				return
			}
			s3err(w, 404, "NoSuchKey")
			return
		}
		w.Header().Set("Last-Modified", o.mod.Format(http.TimeFormat))
		w.Header().Set("ETag", etagOf(o.data))
		data := o.data
		status := 200
		if rng := r.Header.Get("Range"); rng != "" && r.Method == http.MethodGet {
			var a, b int
			if _, err := fmt.Sscanf(rng, "bytes=%d-%d", &a, &b); err != nil || a >= len(data) || b < a {
				s3err(w, 416, "InvalidRange")
				return
			}
			b = min(b, len(data)-1)
			w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", a, b, len(data)))
			data = data[a : b+1]
			status = 206
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		w.WriteHeader(status)
		if r.Method == http.MethodGet {
			w.Write(data)
		}
	default:
		s3err(w, 405, "MethodNotAllowed")
	}
}

// serveCut answers a ranged GET with half the promised bytes, then drops
// the connection.
func (f *fakeS3) serveCut(w http.ResponseWriter, r *http.Request, full string) {
	f.mu.Lock()
	o := f.objects[full]
	f.mu.Unlock()
	var a, b int
	fmt.Sscanf(r.Header.Get("Range"), "bytes=%d-%d", &a, &b)
	b = min(b, len(o.data)-1)
	w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", a, b, len(o.data)))
	w.Header().Set("Content-Length", strconv.Itoa(b-a+1))
	w.WriteHeader(206)
	w.Write(o.data[a : a+(b-a+1)/2])
	w.(http.Flusher).Flush()
	conn, _, err := w.(http.Hijacker).Hijack()
	if err == nil {
		conn.Close()
	}
}

func (f *fakeS3) list(w http.ResponseWriter, bucket string, q map[string][]string) {
	get := func(k string) string {
		if v := q[k]; len(v) > 0 {
			return v[0]
		}
		return ""
	}
	prefix := bucket + "/" + get("prefix")
	var keys []string
	for k := range f.objects {
		if strings.HasPrefix(k, prefix) && k > bucket+"/"+get("continuation-token") {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	var buf bytes.Buffer
	truncated := len(keys) > f.page
	if truncated {
		keys = keys[:f.page]
	}
	fmt.Fprintf(&buf, "<ListBucketResult><Name>%s</Name><IsTruncated>%v</IsTruncated><KeyCount>%d</KeyCount>", bucket, truncated, len(keys))
	for _, k := range keys {
		o := f.objects[k]
		fmt.Fprintf(&buf, "<Contents><Key>%s</Key><Size>%d</Size><LastModified>%s</LastModified></Contents>",
			strings.TrimPrefix(k, bucket+"/"), len(o.data), o.mod.Format(time.RFC3339))
	}
	if truncated {
		fmt.Fprintf(&buf, "<NextContinuationToken>%s</NextContinuationToken>", strings.TrimPrefix(keys[len(keys)-1], bucket+"/"))
	}
	buf.WriteString("</ListBucketResult>")
	w.Write(buf.Bytes())
}

func (f *fakeS3) listUploads(w http.ResponseWriter, bucket string, q map[string][]string) {
	prefix := bucket + "/"
	if v := q["prefix"]; len(v) > 0 {
		prefix += v[0]
	}
	var ids []string
	for id, u := range f.uploads {
		if strings.HasPrefix(u.key, prefix) {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids)
	var buf bytes.Buffer
	buf.WriteString("<ListMultipartUploadsResult><IsTruncated>false</IsTruncated>")
	for _, id := range ids {
		u := f.uploads[id]
		fmt.Fprintf(&buf, "<Upload><Key>%s</Key><UploadId>%s</UploadId><Initiated>%s</Initiated></Upload>",
			strings.TrimPrefix(u.key, bucket+"/"), id, u.initated.Format(time.RFC3339))
	}
	buf.WriteString("</ListMultipartUploadsResult>")
	w.Write(buf.Bytes())
}
