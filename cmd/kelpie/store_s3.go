package main

import (
	"context"
	"flag"
	"net/url"
	"strconv"
	"strings"

	"github.com/kelpie/teleport"
	s3store "github.com/kelpie/teleport/store/s3"
)

// The S3 package store: --store s3://BUCKET/PREFIX works wherever a
// directory does. Where the server is comes from, in order: the URL's query
// (?endpoint=URL&region=R&path_style=BOOL&part_size_mib=N&concurrency=N),
// the environment (KELPIE_S3_ENDPOINT, KELPIE_S3_REGION,
// KELPIE_S3_PATH_STYLE), then the AWS chain (AWS_REGION, AWS_PROFILE, shared
// config). Credentials come only from the AWS chain (environment, shared
// config and credentials files, SSO, ...), never from the URL.
func init() {
	openS3Store = func(ctx context.Context, e *env, spec string) (teleport.Store, error) {
		o, err := s3store.ParseURL(spec, e.getenv)
		if err != nil {
			return nil, usagef("--store: %s", strings.TrimSuffix(err.Error(), ": "+teleport.ErrStore.Error()))
		}
		return s3store.New(ctx, o)
	}
}

// s3Flags are the S3 settings as flags, for commands that take --store:
//
//	s3f := addS3Flags(fs)
//	...
//	spec, err := s3f.storeSpec(*storeSpec)
//
// A flag overrides the URL's query and the environment.
type s3Flags struct {
	endpoint, region, pathStyle *string
}

func addS3Flags(fs *flag.FlagSet) *s3Flags {
	return &s3Flags{
		endpoint:  fs.String("s3-endpoint", "", "S3 API URL for an s3:// store that is not AWS (env KELPIE_S3_ENDPOINT)"),
		region:    fs.String("s3-region", "", "region of an s3:// store (env KELPIE_S3_REGION, then AWS_REGION)"),
		pathStyle: fs.String("s3-path-style", "", "true: address buckets as ENDPOINT/BUCKET (default when an endpoint is set)"),
	}
}

// storeSpec folds the flags into an s3:// store URL.
func (f *s3Flags) storeSpec(spec string) (string, error) {
	set := map[string]string{"endpoint": *f.endpoint, "region": *f.region, "path_style": *f.pathStyle}
	if *f.endpoint == "" && *f.region == "" && *f.pathStyle == "" {
		return spec, nil
	}
	if !strings.HasPrefix(spec, "s3://") {
		return "", usagef("--s3-* flags need --store s3://BUCKET/PREFIX")
	}
	if v := *f.pathStyle; v != "" {
		if _, err := strconv.ParseBool(v); err != nil {
			return "", usagef("--s3-path-style %q: want true or false", v)
		}
	}
	u, err := url.Parse(spec)
	if err != nil {
		return "", usagef("--store %q: %v", spec, err)
	}
	q := u.Query()
	for _, k := range []string{"endpoint", "region", "path_style"} {
		if set[k] != "" {
			q.Set(k, set[k])
		}
	}
	u.RawQuery = q.Encode()
	return u.String(), nil
}
