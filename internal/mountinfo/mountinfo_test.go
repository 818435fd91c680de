package mountinfo

import "testing"

func TestUnescape(t *testing.T) {
	for in, want := range map[string]string{
		`/srv/data0`:       `/srv/data0`,
		`/tmp/a\040b\134c`: `/tmp/a b\c`,
		`/x\011y\012z`:     "/x\ty\nz",
		`/end\04`:          `/end\04`, // too short to be an escape
		`/not\8ab`:         `/not\8ab`,
		`/big\400`:         `/big\400`, // no byte value
		`\134\134`:         `\\`,
		`/run/atrest/fuse/` + `srv-data0\134x2dmnt`: `/run/atrest/fuse/srv-data0\x2dmnt`,
	} {
		if got := Unescape(in); got != want {
			t.Errorf("Unescape(%q) = %q, want %q", in, got, want)
		}
	}
}
