package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/atrest/atrest/blockdev"
)

// firstOptionTimeout bounds the time from the greeting to the first option.
const firstOptionTimeout = 10 * time.Second

// errHandshakeDone ends the option phase without transmission (NBD_OPT_ABORT, an
// unknown NBD_OPT_EXPORT_NAME, a protocol violation).
var errHandshakeDone = errors.New("handshake ended")

// handshake runs the fixed newstyle negotiation ("Fixed newstyle negotiation") and
// returns the export chosen by NBD_OPT_GO or NBD_OPT_EXPORT_NAME, already attached to c.
func (c *serverConn) handshake() (*export, error) {
	deadline := time.Now().Add(c.s.cfg.HandshakeTimeout)
	if err := c.nc.SetDeadline(deadline); err != nil {
		return nil, err
	}
	// A client that has not sent its first option soon is gone or idle: it gets less
	// time than one that is negotiating.
	if err := c.nc.SetReadDeadline(time.Now().Add(min(firstOptionTimeout, c.s.cfg.HandshakeTimeout))); err != nil {
		return nil, err
	}
	keepAlive(c.nc)
	w := bufio.NewWriterSize(c.nc, 4096)
	var b [18]byte
	binary.BigEndian.PutUint64(b[0:], magicInitPasswd)
	binary.BigEndian.PutUint64(b[8:], magicIHaveOpt)
	binary.BigEndian.PutUint16(b[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := w.Write(b[:18]); err != nil {
		return nil, err
	}
	if err := w.Flush(); err != nil {
		return nil, err
	}
	if _, err := io.ReadFull(c.br, b[:4]); err != nil {
		return nil, err
	}
	c.touch()
	cflags := binary.BigEndian.Uint32(b[:4])
	if cflags&^(clientFlagFixedNewstyle|clientFlagNoZeroes) != 0 {
		// "the server MUST drop the TCP connection if the client sets an unknown flag"
		return nil, fmt.Errorf("unknown client flags %#x", cflags)
	}
	noZeroes := cflags&clientFlagNoZeroes != 0

	h := &optionPhase{c: c, w: w}
	for n := 0; ; n++ {
		if n >= c.s.cfg.MaxOptions {
			return nil, fmt.Errorf("more than %d options", c.s.cfg.MaxOptions)
		}
		var oh [optionHeaderLen]byte
		if _, err := io.ReadFull(c.br, oh[:]); err != nil {
			return nil, err
		}
		c.touch()
		if n == 0 {
			if err := c.nc.SetReadDeadline(deadline); err != nil {
				return nil, err
			}
		}
		if binary.BigEndian.Uint64(oh[0:]) != magicIHaveOpt {
			return nil, errors.New("option without IHAVEOPT magic")
		}
		opt := binary.BigEndian.Uint32(oh[8:])
		length := binary.BigEndian.Uint32(oh[12:])
		if length > maxOptionLen {
			return nil, fmt.Errorf("option %d of %d bytes", opt, length)
		}
		data := make([]byte, length)
		if _, err := io.ReadFull(c.br, data); err != nil {
			return nil, err
		}
		if c.stopping.Load() && opt != optAbort {
			// "SHOULD error further options ... with NBD_REP_ERR_SHUTDOWN"
			if err := h.reply(opt, repErrShutdown, []byte("server shutting down")); err != nil {
				return nil, err
			}
			continue
		}
		switch opt {
		case optExportName:
			e := c.s.lookup(string(data))
			if e == nil {
				// "If the chosen export does not exist ... the server MUST terminate the session."
				return nil, fmt.Errorf("unknown export %q", data)
			}
			a, ok := c.enter(e)
			switch {
			case !ok:
				return nil, fmt.Errorf("export %q removed, server shutting down or at its connection limit", data)
			case a.refusal != "":
				// No error can be told with NBD_OPT_EXPORT_NAME: "the server MUST terminate
				// the session" when "requirements for the chosen export are not met".
				return nil, fmt.Errorf("export %q: %s", data, a.refusal)
			}
			c.flags = e.transmissionFlags(c.structured, a.readOnly)
			var r [10 + 124]byte
			binary.BigEndian.PutUint64(r[0:], uint64(e.Device.Size()))
			binary.BigEndian.PutUint16(r[8:], c.flags)
			n := len(r)
			if noZeroes {
				n = 10
			}
			if _, err := w.Write(r[:n]); err != nil {
				return nil, err
			}
			return e, w.Flush()
		case optAbort:
			_ = h.reply(opt, repAck, nil)
			return nil, errHandshakeDone
		case optList:
			if len(data) != 0 {
				if err := h.reply(opt, repErrInvalid, []byte("NBD_OPT_LIST takes no data")); err != nil {
					return nil, err
				}
				continue
			}
			for _, e := range c.s.listExports() {
				p := make([]byte, 4, 4+len(e.Name)+len(e.Description))
				binary.BigEndian.PutUint32(p, uint32(len(e.Name)))
				p = append(p, e.Name...)
				p = append(p, e.Description...)
				if err := h.send(opt, repServer, p); err != nil {
					return nil, err
				}
			}
			if err := h.reply(opt, repAck, nil); err != nil {
				return nil, err
			}
		case optInfo, optGo:
			e, err := h.infoOrGo(opt, data)
			if err != nil {
				return nil, err
			}
			if e != nil {
				return e, nil
			}
		case optAtrestClient:
			if err := h.atrestClient(data); err != nil {
				return nil, err
			}
		case optStructuredReply:
			switch {
			case len(data) != 0:
				err := h.reply(opt, repErrInvalid, []byte("NBD_OPT_STRUCTURED_REPLY takes no data"))
				if err != nil {
					return nil, err
				}
			case c.structured:
				if err := h.reply(opt, repErrInvalid, []byte("structured replies already negotiated")); err != nil {
					return nil, err
				}
			default:
				c.structured = true
				if err := h.reply(opt, repAck, nil); err != nil {
					return nil, err
				}
			}
		default:
			// NBD_OPT_STARTTLS (NOTLS mode), the metadata contexts, extended headers and
			// anything unknown: "reply to them with NBD_REP_ERR_UNSUP".
			msg := fmt.Sprintf("option %d is not supported", opt)
			if err := h.reply(opt, repErrUnsup, []byte(msg)); err != nil {
				return nil, err
			}
		}
	}
}

// optionPhase writes option replies.
type optionPhase struct {
	c *serverConn
	w *bufio.Writer
}

// send queues one option reply.
func (h *optionPhase) send(opt, typ uint32, data []byte) error {
	var b [optReplyHeaderLen]byte
	binary.BigEndian.PutUint64(b[0:], magicOptReply)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], typ)
	binary.BigEndian.PutUint32(b[16:], uint32(len(data)))
	if _, err := h.w.Write(b[:]); err != nil {
		return err
	}
	_, err := h.w.Write(data)
	return err
}

// reply sends the final reply to an option.
func (h *optionPhase) reply(opt, typ uint32, data []byte) error {
	if err := h.send(opt, typ, data); err != nil {
		return err
	}
	return h.w.Flush()
}

// infoOrGo answers NBD_OPT_INFO and NBD_OPT_GO ("NBD_OPT_INFO (6) and NBD_OPT_GO (7)").
// It returns the export when NBD_OPT_GO succeeded.
func (h *optionPhase) infoOrGo(opt uint32, data []byte) (*export, error) {
	invalid := func(msg string) (*export, error) { return nil, h.reply(opt, repErrInvalid, []byte(msg)) }
	if len(data) < 6 {
		return invalid("option data shorter than 6 bytes")
	}
	nameLen := binary.BigEndian.Uint32(data)
	if uint64(nameLen) > uint64(len(data)-6) {
		return invalid("export name length beyond the option data")
	}
	name := string(data[4 : 4+nameLen])
	rest := data[4+nameLen:]
	nreq := int(binary.BigEndian.Uint16(rest))
	if len(rest) != 2+2*nreq {
		return invalid("information request count does not match the option length")
	}
	var wantName, wantDesc, wantVolume bool
	for i := range nreq {
		switch binary.BigEndian.Uint16(rest[2+2*i:]) {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		case infoAtrestVolume:
			wantVolume = true
		}
	}
	e := h.c.s.lookup(name)
	if e == nil {
		return nil, h.reply(opt, repErrUnknown, []byte(fmt.Sprintf("no export named %q", name)))
	}
	// The writer rule decides the access before NBD_INFO_EXPORT tells it; NBD_OPT_INFO
	// gets what NBD_OPT_GO would, without waiting and without taking the volume.
	var a admission
	if opt == optGo {
		var ok bool
		if a, ok = h.c.enter(e); !ok {
			return nil, h.reply(opt, repErrShutdown, []byte("export removed, server shutting down or at its connection limit"))
		}
	} else {
		h.c.s.resolveWriter(h.c)
		a, _ = h.c.s.admit(h.c, e, false, true)
	}
	if a.refusal != "" {
		return nil, h.reply(opt, repErrPolicy, []byte(a.refusal))
	}
	flags := e.transmissionFlags(h.c.structured, a.readOnly)
	var ie [12]byte
	binary.BigEndian.PutUint16(ie[0:], infoExport)
	binary.BigEndian.PutUint64(ie[2:], uint64(e.Device.Size()))
	binary.BigEndian.PutUint16(ie[10:], flags)
	if err := h.send(opt, repInfo, ie[:]); err != nil {
		return nil, err
	}
	// Block sizes go out even unasked: they are the defaults' equivalent (minimum 1,
	// maximum at least 32 MiB), so a client that ignores them stays within them.
	var bs [14]byte
	binary.BigEndian.PutUint16(bs[0:], infoBlockSize)
	binary.BigEndian.PutUint32(bs[2:], 1)
	binary.BigEndian.PutUint32(bs[6:], e.preferred)
	binary.BigEndian.PutUint32(bs[10:], uint32(h.c.s.cfg.MaxRequestSize))
	if err := h.send(opt, repInfo, bs[:]); err != nil {
		return nil, err
	}
	if wantName {
		if err := h.send(opt, repInfo, append([]byte{0, byte(infoName)}, e.Name...)); err != nil {
			return nil, err
		}
	}
	if wantDesc && e.Description != "" {
		if err := h.send(opt, repInfo, append([]byte{0, byte(infoDescription)}, e.Description...)); err != nil {
			return nil, err
		}
	}
	if wantVolume && !e.VolumeID.IsZero() {
		if err := h.send(opt, repInfo, append(binary.BigEndian.AppendUint16(nil, infoAtrestVolume), e.VolumeID[:]...)); err != nil {
			return nil, err
		}
	}
	if opt == optInfo {
		return nil, h.reply(opt, repAck, nil)
	}
	h.c.flags = flags
	return e, h.reply(opt, repAck, nil)
}

// transmissionFlags are the flags advertised for e ("Transmission flags"): only what
// the server really does, with the Device's capabilities asked now. FUA and
// WRITE_ZEROES work on every Device (blockdev.WriteFUA and WriteZeroes fall back to a
// write and a flush, or to writing zeroes), and FAST_ZERO is honoured by every one (a
// Device that cannot zero fast refuses at once: "Servers MAY set this transmission flag
// even if it will always use NBD_ENOTSUP failures"); TRIM only where the Device trims.
// readOnly: the connection may not write (the writer rule).
func (e *export) transmissionFlags(structured, readOnly bool) uint16 {
	caps := blockdev.CapsOf(e.Device)
	// Every connection to an export uses the same Device, whose Flush covers every write
	// that returned before it, whichever goroutine made it: a FLUSH on one connection
	// covers the writes answered on all of them, so CAN_MULTI_CONN is true.
	f := tflagHasFlags | tflagSendFlush | tflagSendCache | tflagCanMultiConn
	if structured {
		f |= tflagSendDF // every READ is answered with a single data chunk anyway
	}
	if e.Rotational {
		f |= tflagRotational
	}
	if e.ReadOnly || readOnly || caps.ReadOnly {
		return f | tflagReadOnly
	}
	f |= tflagSendFUA | tflagSendWriteZeroes | tflagSendFastZero
	if caps.Trim {
		f |= tflagSendTrim
	}
	return f
}
