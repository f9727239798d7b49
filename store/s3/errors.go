package s3

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/smithy-go"

	"github.com/kelpie/teleport"
)

// ErrCredentials marks a request the server refused because of who sent it
// (missing, wrong or expired credentials, or a signature the server does
// not accept). It always comes wrapped together with teleport.ErrStore.
var ErrCredentials = errors.New("S3 credentials rejected")

// Error is a failed S3 operation. Its message is one line fit for a user;
// Unwrap yields the teleport category (ErrNotFound, ErrAlreadyExists,
// ErrStore, a context error) and the SDK's own error for developers.
type Error struct {
	Op       string // "get", "put", "upload part", ...
	Key      string // bucket/key, or bucket/prefix for listings
	Msg      string
	Attempts int
	Kind     error
	Err      error
}

func (e *Error) Error() string {
	s := "s3 " + e.Op + " " + e.Key + ": " + e.Msg
	if e.Attempts > 1 {
		s += fmt.Sprintf(" (after %d attempts)", e.Attempts)
	}
	return s
}

func (e *Error) Unwrap() []error {
	if e.Err == nil {
		return []error{e.Kind}
	}
	return []error{e.Kind, e.Err}
}

// S3 error codes by meaning. Servers differ in which they send (a HEAD has
// no body, so only its status tells).
var (
	notFoundCodes = map[string]bool{"NoSuchKey": true, "NotFound": true}
	credCodes     = map[string]bool{
		"AccessDenied": true, "SignatureDoesNotMatch": true, "InvalidAccessKeyId": true, "InvalidToken": true,
		"ExpiredToken": true, "TokenRefreshRequired": true, "AuthorizationHeaderMalformed": true,
		"InvalidClientTokenId": true, "MissingSecurityHeader": true, "RequestTimeTooSkewed": true,
	}
	transientCodes = map[string]bool{
		"SlowDown": true, "Throttling": true, "ThrottlingException": true, "RequestLimitExceeded": true,
		"TooManyRequests": true, "RequestThrottled": true, "BandwidthLimitExceeded": true,
		"ServiceUnavailable": true, "InternalError": true, "RequestTimeout": true,
		// AWS answers 409 to a conditional write racing another; the retry
		// then sees the winner (412) or wins itself.
		"ConditionalRequestConflict": true, "OperationAborted": true,
	}
)

func apiCode(err error) (code, msg string) {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		return ae.ErrorCode(), ae.ErrorMessage()
	}
	return "", ""
}

func httpStatus(err error) int {
	var re *awshttp.ResponseError
	if errors.As(err, &re) {
		return re.HTTPStatusCode()
	}
	return 0
}

// retryable reports whether err is worth another attempt: throttling, a 5xx,
// a dropped or refused connection, a body cut short.
func retryable(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false
	}
	if code, _ := apiCode(err); transientCodes[code] {
		return true
	}
	if st := httpStatus(err); st >= 500 || st == http.StatusTooManyRequests {
		return true
	}
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EPIPE) || errors.Is(err, errShortBody) {
		return true
	}
	return retry.RetryableConnectionError{}.IsErrorRetryable(err) == aws.TrueTernary
}

// errShortBody: a GET answered with fewer bytes than its range asked for.
var errShortBody = errors.New("response body shorter than requested")

// wrap turns an SDK error into an *Error with a teleport category. endpoint
// names the server in connection failures.
func (s *Store) wrap(op, key string, attempts int, err error) error {
	if err == nil {
		return nil
	}
	var already *Error
	if errors.As(err, &already) {
		return err
	}
	e := &Error{Op: op, Key: s.bucket + "/" + key, Attempts: attempts, Err: err, Kind: teleport.ErrStore}
	code, msg := apiCode(err)
	status := httpStatus(err)
	switch {
	case errors.Is(err, context.Canceled):
		e.Kind, e.Msg = context.Canceled, "canceled"
	case errors.Is(err, context.DeadlineExceeded):
		e.Kind, e.Msg = context.DeadlineExceeded, "deadline exceeded"
	case notFoundCodes[code] || (code == "" && status == http.StatusNotFound):
		e.Kind, e.Msg = teleport.ErrNotFound, "no such object"
	case code == "NoSuchBucket":
		e.Msg = fmt.Sprintf("bucket %q does not exist on %s", s.bucket, s.endpointName())
	case code == "NoSuchUpload":
		e.Msg = "the multipart upload is gone (aborted, or removed by gc)"
	case code == "PreconditionFailed" || status == http.StatusPreconditionFailed:
		e.Kind, e.Msg = teleport.ErrAlreadyExists, "precondition failed: the object already exists"
	case isCredentialLookup(err):
		e.Kind = errors.Join(teleport.ErrStore, ErrCredentials)
		e.Msg = "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
	case credCodes[code] || status == http.StatusForbidden:
		e.Kind = errors.Join(teleport.ErrStore, ErrCredentials)
		reason := code
		if reason == "" {
			reason = firstLine(err)
		}
		e.Msg = fmt.Sprintf("%s refused the credentials (%s): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and the region (%s)", s.endpointName(), reason, s.region)
	case code != "":
		e.Msg = code
		if msg != "" {
			e.Msg += ": " + msg
		}
		if status != 0 {
			e.Msg += fmt.Sprintf(" (HTTP %d)", status)
		}
	case errors.Is(err, syscall.ECONNREFUSED):
		e.Msg = fmt.Sprintf("cannot reach %s: connection refused", s.endpointName())
	case status != 0:
		e.Msg = fmt.Sprintf("HTTP %d %s", status, http.StatusText(status))
	default:
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			e.Msg = fmt.Sprintf("%s timed out", s.endpointName())
		} else {
			e.Msg = innermost(err)
		}
	}
	return e
}

// isCredentialLookup: the SDK found no credentials to sign with.
func isCredentialLookup(err error) bool {
	return strings.Contains(err.Error(), "failed to retrieve credentials") ||
		strings.Contains(err.Error(), "failed to refresh cached credentials")
}

// innermost is the last error in the chain: the SDK's outer layers repeat
// the operation name and add nothing a user needs.
func innermost(err error) string {
	for {
		u := errors.Unwrap(err)
		if u == nil {
			return firstLine(err)
		}
		err = u
	}
}

func firstLine(err error) string {
	s := err.Error()
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}
