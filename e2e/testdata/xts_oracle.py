"""Decrypt sectors of a LUKS2 aes-xts-plain64 data segment without atrest.

usage: xts_oracle.py IMAGE KEYHEX DATA_OFFSET SECTOR_SIZE OFFSET:LENGTH...

Writes the plaintext of each range [OFFSET, OFFSET+LENGTH) of the data segment (both
multiples of SECTOR_SIZE) to stdout, one after the other. KEYHEX is the 64-byte volume key as cryptsetup's
`luksDump --dump-volume-key` prints it. The tweak of a sector is plain64 of its byte
offset within the segment divided by 512, little-endian, in 512-byte units even for
4096-byte sectors (cryptsetup's rule, LUKS2 spec and docs/luks2-profile.md).
Uses python3-cryptography (OpenSSL), an implementation independent of atrest's.
"""
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def decrypt(f, key, data_offset, sector, offset, length):
    if offset % sector or length % sector:
        sys.exit("xts_oracle: range %d:%d is not sector-aligned" % (offset, length))
    f.seek(data_offset + offset)
    ct = f.read(length)
    if len(ct) != length:
        sys.exit("xts_oracle: short read")
    out = bytearray()
    for i in range(0, length, sector):
        tweak = ((offset + i) // 512).to_bytes(16, "little")
        dec = Cipher(algorithms.AES(key), modes.XTS(tweak)).decryptor()
        out += dec.update(ct[i:i + sector]) + dec.finalize()
    return out


def main():
    image, keyhex = sys.argv[1], sys.argv[2]
    data_offset, sector = int(sys.argv[3]), int(sys.argv[4])
    key = bytes.fromhex(keyhex)
    if len(key) != 64:
        sys.exit("xts_oracle: want a 64-byte key")
    with open(image, "rb") as f:
        for r in sys.argv[5:]:
            offset, length = (int(x) for x in r.split(":"))
            sys.stdout.buffer.write(decrypt(f, key, data_offset, sector, offset, length))


main()
