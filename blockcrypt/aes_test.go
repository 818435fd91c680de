package blockcrypt

import "crypto/aes"

var aesNew = aes.NewCipher
