package node

import (
	"errors"
	"net/http"
	"os"
	"syscall"

	"github.com/atrest/atrest/blockcrypt"
	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/drive"
	"github.com/atrest/atrest/keystore"
	"github.com/atrest/atrest/luks2"
	"github.com/atrest/atrest/registry"
)

// An error class is what an error means to a caller on the other side of the control
// API: a stable code word, the HTTP status it travels with, and the sentinels it
// stands for. ErrorCode classifies an error of a Service; RemoteError rebuilds, from a
// code and a message, an error that matches the same sentinels, so that a front end
// (the CLI's exit codes and hints) treats an error of the daemon as it treats the same
// error of an offline Node.
type errorClass struct {
	code   string
	status int
	is     []error
}

// errorClasses, most specific first: ErrorCode takes the first that matches.
var errorClasses = []errorClass{
	{"invalid", http.StatusBadRequest, []error{ErrInvalid, registry.ErrInvalid}},
	{"ambiguous", http.StatusBadRequest, []error{registry.ErrAmbiguous}},
	{"rotation-running", http.StatusConflict, []error{ErrRotationRunning}},
	{"rotation-under-way", http.StatusConflict, []error{keystore.ErrRotationUnderWay}},
	{"busy", http.StatusConflict, []error{keystore.ErrBusy}},
	{"in-use", http.StatusConflict, []error{blockdev.ErrInUse}},
	{"exists", http.StatusConflict, []error{registry.ErrExists, keystore.ErrExists}},
	{"holds-data", http.StatusConflict, []error{ErrHoldsData}},
	{"conflict", http.StatusConflict, []error{ErrConflict}},
	{"drive-missing", http.StatusConflict, []error{keystore.ErrDriveMissing}},
	{"not-found", http.StatusNotFound, []error{ErrNotFound, registry.ErrNotFound}},
	{"no-drive", http.StatusNotFound, []error{ErrNoDrive}},
	{"not-exist", http.StatusNotFound, []error{os.ErrNotExist}},
	{"foreign", http.StatusUnprocessableEntity, []error{drive.ErrForeign}},
	{"wrong-key", http.StatusUnprocessableEntity, []error{luks2.ErrWrongKey}},
	{"header-damaged", http.StatusUnprocessableEntity, []error{luks2.ErrDamaged}},
	{"truncated", http.StatusUnprocessableEntity, []error{luks2.ErrTruncated, blockcrypt.ErrRegion}},
	{"unsupported", http.StatusUnprocessableEntity, []error{luks2.ErrUnsupported}},
	{"not-luks", http.StatusUnprocessableEntity, []error{luks2.ErrNotLUKS}},
	{"no-keystore", http.StatusInternalServerError, []error{keystore.ErrNoKeystore}},
	{"keystore-unsafe", http.StatusInternalServerError, []error{keystore.ErrUnsafe}},
	{"keystore-corrupt", http.StatusInternalServerError, []error{keystore.ErrCorrupt, registry.ErrCorrupt}},
	{"stray-key", http.StatusInternalServerError, []error{keystore.ErrStrayKey}},
	{"not-migrated", http.StatusInternalServerError, []error{keystore.ErrNotMigrated}},
	{"permission", http.StatusForbidden, []error{os.ErrPermission}},
	{"gone", http.StatusBadGateway, []error{blockdev.ErrGone}},
	{"medium", http.StatusBadGateway, []error{blockdev.ErrMedium}},
	{"io", http.StatusBadGateway, []error{syscall.EIO}},
	{"timeout", http.StatusGatewayTimeout, []error{blockdev.ErrTimeout}},
	{"offline", http.StatusServiceUnavailable, []error{ErrOffline, ErrServing}},
}

// ErrHoldsData: a drive to format holds data (HoldsDataError matches it).
var ErrHoldsData = errors.New("the drive holds data")

// ErrWrongKey: no key given opens the drive (luks2.ErrWrongKey, for front ends that
// do not import the layers).
var ErrWrongKey = luks2.ErrWrongKey

// ErrorCode returns the class of err: its code word and HTTP status; "internal" and
// 500 for an error of no known class.
func ErrorCode(err error) (code string, status int) {
	for _, c := range errorClasses {
		for _, target := range c.is {
			if errors.Is(err, target) {
				return c.code, c.status
			}
		}
	}
	return "internal", http.StatusInternalServerError
}

// RemoteError is an error of a Service on the other side of the control API: its
// message as the node wrote it, and its class, by which it matches the sentinels of
// that class (errors.Is).
type RemoteError struct {
	Code    string
	Message string
}

func (e *RemoteError) Error() string { return e.Message }

// Is matches the sentinels of the error's class.
func (e *RemoteError) Is(target error) bool {
	for _, c := range errorClasses {
		if c.code == e.Code {
			for _, t := range c.is {
				if t == target {
					return true
				}
			}
			return false
		}
	}
	return false
}

// ErrorStatus is the HTTP status of a code word (500 for one it does not know).
func ErrorStatus(code string) int {
	for _, c := range errorClasses {
		if c.code == code {
			return c.status
		}
	}
	return http.StatusInternalServerError
}
