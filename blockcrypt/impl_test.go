package blockcrypt

import (
	"errors"
	"testing"
)

// forEachImplementation runs f as a subtest under every implementation compiled in (the
// pattern of crypto/cipher's implementations.go in the Go tree). Implementations the
// CPU cannot run are reported as skipped, by name.
func forEachImplementation(t *testing.T, f func(t *testing.T, impl *implementation)) {
	t.Helper()
	for _, impl := range implementations {
		t.Run(impl.name, func(t *testing.T) {
			if !impl.available {
				t.Skipf("implementation %s is not supported by this CPU", impl.name)
			}
			f(t, impl)
		})
	}
}

// mustCipher returns a Cipher with the given implementation, closed at cleanup.
func mustCipher(t testing.TB, impl *implementation, key []byte) *Cipher {
	t.Helper()
	c, err := newCipherWith(impl, key)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func TestImplementationTable(t *testing.T) {
	if len(implementations) == 0 || implementations[len(implementations)-1] != genericImplementation {
		t.Fatal("the pure-Go implementation must be registered last")
	}
	if !genericImplementation.available {
		t.Fatal("the pure-Go implementation must always be available")
	}
	names := Implementations()
	if len(names) == 0 || names[len(names)-1] != "purego" {
		t.Fatalf("Implementations() = %v, want purego last", names)
	}
	seen := map[string]bool{}
	for _, impl := range implementations {
		if seen[impl.name] {
			t.Errorf("implementation name %q registered twice", impl.name)
		}
		seen[impl.name] = true
	}
	c, err := NewCipher(testKey(1))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.Implementation() != names[0] {
		t.Errorf("NewCipher uses %s, want the best available, %s", c.Implementation(), names[0])
	}
}

// testKey returns a valid 64-byte key derived from seed (halves differ).
func testKey(seed byte) []byte {
	k := make([]byte, KeySize)
	for i := range k {
		k[i] = seed*31 + byte(i)*7 + 1
	}
	return k
}

// TestNewCipherImpl: every implementation this CPU runs can be chosen by name, and an
// unknown name is refused.
func TestNewCipherImpl(t *testing.T) {
	for _, name := range Implementations() {
		c, err := NewCipherImpl(name, testKey(40))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if c.Implementation() != name {
			t.Errorf("asked for %s, got %s", name, c.Implementation())
		}
		c.Close()
	}
	if _, err := NewCipherImpl("nonesuch", testKey(40)); err == nil {
		t.Error("an unknown implementation was accepted")
	}
	if _, err := NewCipherImpl("purego", make([]byte, 32)); !errors.Is(err, ErrKeySize) {
		t.Errorf("a 32-byte key: %v, want ErrKeySize", err)
	}
}
