package luks2

import (
	"crypto/pbkdf2"
	"crypto/sha256"
	"fmt"

	"golang.org/x/crypto/argon2"
)

// deriveHook, when set (by tests), is called before every key derivation.
var deriveHook func()

// derive runs the keyslot's KDF. checkKDF must have accepted k.
func derive(k *KDF, passphrase []byte, keyLen int) ([]byte, error) {
	if deriveHook != nil {
		deriveHook()
	}
	switch k.Type {
	case "pbkdf2":
		return pbkdf2SHA256(passphrase, k.Salt, k.Iterations, keyLen)
	case "argon2i":
		return argon2.Key(passphrase, k.Salt, uint32(k.Time), uint32(k.Memory), uint8(k.CPUs), uint32(keyLen)), nil
	case "argon2id":
		return argon2.IDKey(passphrase, k.Salt, uint32(k.Time), uint32(k.Memory), uint8(k.CPUs), uint32(keyLen)), nil
	}
	panic("BUG: luks2: derive called with kdf " + k.Type)
}

// pbkdf2SHA256 is PBKDF2-HMAC-SHA256; the passphrase is a master key file's raw bytes.
func pbkdf2SHA256(passphrase, salt []byte, iter, keyLen int) ([]byte, error) {
	// crypto/pbkdf2 takes the password as a string; the conversion copies the key
	// bytes into memory that cannot be zeroed (see the Go caveat in keystore's doc).
	k, err := pbkdf2.Key(sha256.New, string(passphrase), salt, iter, keyLen)
	if err != nil {
		return nil, fmt.Errorf("pbkdf2: %w", err)
	}
	return k, nil
}
