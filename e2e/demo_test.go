package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/atrest/atrest/internal/testutil"
)

// TestDemoScript runs the README's main-job command, scripts/demo.sh, end to end with
// --cleanup in a directory of the test's, so that the README's promise is checked on
// every run: keystore, two drives, serve, mount, write, status, rotation, and no
// plaintext on the drives.
func TestDemoScript(t *testing.T) {
	if raceBuild {
		t.Skip("the demo builds its own binary; it runs in the pass without -race")
	}
	testutil.Root(t)
	testutil.Tool(t, "nbdinfo")
	gomod, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Dir(strings.TrimSpace(string(gomod)))
	dir := filepath.Join(t.TempDir(), "demo")
	cmd := exec.Command(filepath.Join(root, "scripts", "demo.sh"), "--cleanup", dir)
	cmd.Env = cleanEnv()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("scripts/demo.sh: %v\n%s", err, out)
	}
	for _, want := range []string{
		"Data Encrypted:           yes",
		"Key rotation complete",
		"lines with the marker on drive0.img: 0",
		"lines with the marker on drive1.img: 0",
		"The plaintext is in the mount and nowhere on the drives.",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("demo output lacks %q:\n%s", want, out)
		}
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("--cleanup left %s behind (stat: %v)", dir, err)
	}
}
