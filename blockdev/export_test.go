package blockdev

// DirectDir gives the external tests (package blockdev_test) the internal tests' helper.
var DirectDir = directDir
