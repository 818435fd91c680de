package volmount

import (
	"reflect"
	"testing"
)

func TestParseMountinfo(t *testing.T) {
	data := []byte(`22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
36 22 7:3 / /srv/with\040space rw,relatime shared:2 master:1 - ext4 /dev/loop3 rw
37 22 0:52 / /run/atrest/fuse/vol rw,nosuid,nodev,noexec,relatime - fuse.atrest atrest rw,user_id=0,group_id=0,max_read=1048576
38 22 0:53 / /back\134slash rw - tmpfs tmpfs rw
`)
	got, err := parseMountinfo(data)
	if err != nil {
		t.Fatal(err)
	}
	want := []mountEntry{
		{254, 1, "/", "ext4", "/dev/vda"},
		{7, 3, "/srv/with space", "ext4", "/dev/loop3"},
		{0, 52, "/run/atrest/fuse/vol", "fuse.atrest", "atrest"},
		{0, 53, `/back\slash`, "tmpfs", "tmpfs"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("parseMountinfo =\n%v\nwant\n%v", got, want)
	}
	if m, ok := mountAt(got, "/srv/with space"); !ok || m.source != "/dev/loop3" {
		t.Errorf("mountAt = %v, %v", m, ok)
	}
	if _, ok := mountAt(got, "/srv"); ok {
		t.Error("mountAt found a mount on a path that has none")
	}
	for _, bad := range []string{
		"36 22 7:3 / /mnt rw shared:2\n",             // no separator
		"36 22 7:3 / /mnt rw - ext4\n",               // no source
		"36 22 seven:3 / /mnt rw - ext4 /dev/x rw\n", // bad device number
	} {
		if _, err := parseMountinfo([]byte(bad)); err == nil {
			t.Errorf("parseMountinfo(%q) succeeded", bad)
		}
	}
}

func TestParseOwnMountinfo(t *testing.T) {
	mounts, err := readMounts()
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := mountAt(mounts, "/"); !ok {
		t.Error("/ is not in /proc/self/mountinfo")
	}
}
