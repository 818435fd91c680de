package blockcrypt

// crypter is one implementation of XTS-AES-256 holding its expanded keys. Every
// method may be called concurrently with the others except wipe.
//
// All lengths are multiples of 16 and dst and src are either the same slice or do not
// overlap; Cipher checks this before calling.
type crypter interface {
	// encryptSectors and decryptSectors process len(src)/sectorSize sectors; sector
	// k uses the plain64 tweak iv + k*(sectorSize/512).
	encryptSectors(dst, src []byte, sectorSize int, iv uint64)
	decryptSectors(dst, src []byte, sectorSize int, iv uint64)
	// encryptUnit and decryptUnit process src as one XTS data unit whose tweak (before
	// encryption with key2) is the 16 given bytes, as in IEEE P1619 test vectors.
	encryptUnit(dst, src []byte, tweak *[16]byte)
	decryptUnit(dst, src []byte, tweak *[16]byte)
	// wipe zeroes the key material the implementation owns.
	wipe()
}

// implementation is an entry of the implementation table.
type implementation struct {
	// name is short and stable; it shows in test names, benchmarks and `atrest speed`.
	name string
	// available reports whether the CPU can run it.
	available bool
	// newCrypter expands key1 (data) and key2 (tweak), 32 bytes each.
	newCrypter func(key1, key2 []byte) crypter
}

// implementations lists every implementation compiled in, best first. The pure-Go one
// is last and always available (package-level initialisation puts it there before any
// init function runs); assembly files prepend theirs with register in init.
var implementations = []*implementation{genericImplementation}

// register adds an implementation ahead of those already registered. Called from init
// functions only.
func register(impl *implementation) {
	implementations = append([]*implementation{impl}, implementations...)
}

// bestImplementation is the first available implementation.
func bestImplementation() *implementation {
	for _, impl := range implementations {
		if impl.available {
			return impl
		}
	}
	panic("BUG: blockcrypt: no XTS implementation available (the pure-Go one always is)")
}

// Implementations returns the names of the XTS implementations compiled in that this
// CPU can run, best first. NewCipher uses the first.
func Implementations() []string {
	var names []string
	for _, impl := range implementations {
		if impl.available {
			names = append(names, impl.name)
		}
	}
	return names
}
