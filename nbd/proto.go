package nbd

import (
	"encoding/binary"
	"fmt"
	"net"
)

// Wire constants of the NBD protocol, written from the specification
// (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md); each group
// names the section it comes from. github.com/pojntfx/go-nbd uses the same values.

// Magic numbers ("Handshake", "Fixed newstyle negotiation", "Request message", "Simple
// reply message", "Structured reply chunk message").
const (
	magicInitPasswd     uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	magicIHaveOpt       uint64 = 0x49484156454F5054 // "IHAVEOPT"
	magicOptReply       uint64 = 0x3e889045565a9
	magicRequest        uint32 = 0x25609513
	magicSimpleReply    uint32 = 0x67446698
	magicStructuredRepl uint32 = 0x668e33ef
)

// Handshake flags sent by the server ("Handshake flags").
const (
	flagFixedNewstyle uint16 = 1 << 0
	flagNoZeroes      uint16 = 1 << 1
)

// Client flags ("Client flags").
const (
	clientFlagFixedNewstyle uint32 = 1 << 0
	clientFlagNoZeroes      uint32 = 1 << 1
)

// Transmission flags ("Transmission flags").
const (
	tflagHasFlags        uint16 = 1 << 0
	tflagReadOnly        uint16 = 1 << 1
	tflagSendFlush       uint16 = 1 << 2
	tflagSendFUA         uint16 = 1 << 3
	tflagRotational      uint16 = 1 << 4
	tflagSendTrim        uint16 = 1 << 5
	tflagSendWriteZeroes uint16 = 1 << 6
	tflagSendDF          uint16 = 1 << 7
	tflagCanMultiConn    uint16 = 1 << 8
	tflagSendResize      uint16 = 1 << 9
	tflagSendCache       uint16 = 1 << 10
	tflagSendFastZero    uint16 = 1 << 11
)

// Option types ("Option types").
const (
	optExportName      uint32 = 1
	optAbort           uint32 = 2
	optList            uint32 = 3
	optPeekExport      uint32 = 4
	optStartTLS        uint32 = 5
	optInfo            uint32 = 6
	optGo              uint32 = 7
	optStructuredReply uint32 = 8
	optListMetaContext uint32 = 9
	optSetMetaContext  uint32 = 10
	optExtendedHeaders uint32 = 11
)

// Option reply types ("Option reply types"); errors have bit 31 set.
const (
	repAck              uint32 = 1
	repServer           uint32 = 2
	repInfo             uint32 = 3
	repMetaContext      uint32 = 4
	repErrUnsup         uint32 = 1<<31 + 1
	repErrPolicy        uint32 = 1<<31 + 2
	repErrInvalid       uint32 = 1<<31 + 3
	repErrPlatform      uint32 = 1<<31 + 4
	repErrTLSReqd       uint32 = 1<<31 + 5
	repErrUnknown       uint32 = 1<<31 + 6
	repErrShutdown      uint32 = 1<<31 + 7
	repErrBlockSizeReqd uint32 = 1<<31 + 8
	repErrTooBig        uint32 = 1<<31 + 9
)

// Information types of NBD_REP_INFO ("NBD_REP_INFO").
const (
	infoExport      uint16 = 0
	infoName        uint16 = 1
	infoDescription uint16 = 2
	infoBlockSize   uint16 = 3
)

// atrest's extensions of the handshake (docs/nbd.md). Their numbers are far from those
// the specification assigns, so that they cannot clash with a future one: other servers
// answer the option with NBD_REP_ERR_UNSUP, and other clients never ask for the
// information type ("The server MUST ignore any information requests it does not
// understand"; "The client MUST ignore information replies it does not understand").
const (
	// optAtrestClient presents the client's writer identity: 16 bytes writer id, 32 bits
	// flags, then a description for people (the rest of the data, at most
	// maxWriterDescription bytes of printable UTF-8).
	optAtrestClient uint32 = 0x61747201 // "atr" 1
	// infoAtrestVolume is the volume identity of an export: 16 bytes, a UUID.
	infoAtrestVolume uint16 = 0x6174 // "at"

	atrestClientReadOnly uint32 = 1 << 0 // the client never writes: it never holds the volume
	atrestClientTakeOver uint32 = 1 << 1 // end the current writer's connections and take its place
	atrestClientFlags           = atrestClientReadOnly | atrestClientTakeOver

	writerIDLen          = 16
	atrestClientFixedLen = writerIDLen + 4
	maxWriterDescription = 256
)

// Command types ("Request types").
const (
	cmdRead        uint16 = 0
	cmdWrite       uint16 = 1
	cmdDisc        uint16 = 2
	cmdFlush       uint16 = 3
	cmdTrim        uint16 = 4
	cmdCache       uint16 = 5
	cmdWriteZeroes uint16 = 6
	cmdBlockStatus uint16 = 7
)

// Command flags ("Command flags").
const (
	cmdFlagFUA      uint16 = 1 << 0
	cmdFlagNoHole   uint16 = 1 << 1
	cmdFlagDF       uint16 = 1 << 2
	cmdFlagReqOne   uint16 = 1 << 3
	cmdFlagFastZero uint16 = 1 << 4
)

// Structured reply flags and chunk types ("Structured reply flags", "Structured reply
// types").
const (
	replyFlagDone uint16 = 1 << 0

	replyTypeNone        uint16 = 0
	replyTypeOffsetData  uint16 = 1
	replyTypeOffsetHole  uint16 = 2
	replyTypeBlockStatus uint16 = 5
	replyTypeError       uint16 = 1<<15 + 1
	replyTypeErrorOffset uint16 = 1<<15 + 2
)

// Error values ("Error values").
const (
	errPerm      uint32 = 1
	errIO        uint32 = 5
	errNoMem     uint32 = 12
	errInval     uint32 = 22
	errNoSpc     uint32 = 28
	errOverflow  uint32 = 75
	errNotSup    uint32 = 95
	errShutdown  uint32 = 108
	maxStringLen        = 4096 // "strings ... MUST be no longer than 4096 bytes"
)

// Sizes of fixed parts on the wire.
const (
	requestHeaderLen    = 28 // magic 4, flags 2, type 2, cookie 8, offset 8, length 4
	simpleReplyLen      = 16 // magic 4, error 4, cookie 8
	structuredHeaderLen = 20 // magic 4, flags 2, type 2, cookie 8, length 4
	optionHeaderLen     = 16 // IHAVEOPT 8, option 4, length 4
	optReplyHeaderLen   = 20 // magic 8, option 4, type 4, length 4
)

// DefaultPort is the IANA port of NBD ("Newstyle negotiation").
const DefaultPort = 10809

// request is a transmission-phase request header.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	offset uint64
	length uint32
}

func (r *request) encode(b []byte) {
	_ = b[requestHeaderLen-1]
	binary.BigEndian.PutUint32(b[0:], magicRequest)
	binary.BigEndian.PutUint16(b[4:], r.flags)
	binary.BigEndian.PutUint16(b[6:], r.typ)
	binary.BigEndian.PutUint64(b[8:], r.cookie)
	binary.BigEndian.PutUint64(b[16:], r.offset)
	binary.BigEndian.PutUint32(b[24:], r.length)
}

// decodeRequest parses a request header; it returns false on a wrong magic.
func decodeRequest(b []byte, r *request) bool {
	_ = b[requestHeaderLen-1]
	if binary.BigEndian.Uint32(b[0:]) != magicRequest {
		return false
	}
	r.flags = binary.BigEndian.Uint16(b[4:])
	r.typ = binary.BigEndian.Uint16(b[6:])
	r.cookie = binary.BigEndian.Uint64(b[8:])
	r.offset = binary.BigEndian.Uint64(b[16:])
	r.length = binary.BigEndian.Uint32(b[24:])
	return true
}

func putSimpleReply(b []byte, errno uint32, cookie uint64) {
	_ = b[simpleReplyLen-1]
	binary.BigEndian.PutUint32(b[0:], magicSimpleReply)
	binary.BigEndian.PutUint32(b[4:], errno)
	binary.BigEndian.PutUint64(b[8:], cookie)
}

func putStructuredHeader(b []byte, flags, typ uint16, cookie uint64, length uint32) {
	_ = b[structuredHeaderLen-1]
	binary.BigEndian.PutUint32(b[0:], magicStructuredRepl)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], cookie)
	binary.BigEndian.PutUint32(b[16:], length)
}

var cmdNames = map[uint16]string{
	cmdRead: "read", cmdWrite: "write", cmdDisc: "disconnect", cmdFlush: "flush",
	cmdTrim: "trim", cmdCache: "cache", cmdWriteZeroes: "write-zeroes", cmdBlockStatus: "block-status",
}

func cmdName(t uint16) string {
	if n, ok := cmdNames[t]; ok {
		return n
	}
	return fmt.Sprintf("command %d", t)
}

var errnoNames = map[uint32]string{
	errPerm: "EPERM", errIO: "EIO", errNoMem: "ENOMEM", errInval: "EINVAL", errNoSpc: "ENOSPC",
	errOverflow: "EOVERFLOW", errNotSup: "ENOTSUP", errShutdown: "ESHUTDOWN",
}

func errnoName(e uint32) string {
	if n, ok := errnoNames[e]; ok {
		return n
	}
	return fmt.Sprintf("error %d", e)
}

// socketBuffer is the socket send and receive buffer asked for on each connection.
const socketBuffer = 4 << 20

// setSocketBuffers asks for socketBuffer-sized send and receive buffers on nc, when it
// has them (TCP and Unix sockets; not net.Pipe), once the handshake is done on the
// server and before it on the client. A 1 MiB reply or WRITE payload then crosses in
// one or two system calls instead of a dozen (the kernel caps these at
// net.core.wmem_max/rmem_max).
func setSocketBuffers(nc net.Conn) {
	if b, ok := nc.(interface {
		SetWriteBuffer(int) error
		SetReadBuffer(int) error
	}); ok {
		_ = b.SetWriteBuffer(socketBuffer)
		_ = b.SetReadBuffer(socketBuffer)
	}
}
