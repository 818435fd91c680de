package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// Probe reports whether the NBD server at addr (see ParseAddress) answers and offers
// the export that addr names, within ctx: it connects, reads the server's greeting,
// asks NBD_OPT_INFO about the export and ends the handshake with NBD_OPT_ABORT. It
// never enters transmission, so the server counts no client of the export for it. An
// export that the server does not have fails with ErrNoExport; a server that
// answers but does not know NBD_OPT_INFO (older servers) counts as offering it.
//
// `atrest umount` uses it to tell a mount whose server is gone (then it takes the
// mount down without waiting for I/O that cannot complete) from one whose server
// answers.
func Probe(ctx context.Context, addr string) error {
	a, err := ParseAddress(addr)
	if err != nil {
		return err
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, a.Network, a.Addr)
	if err != nil {
		return fmt.Errorf("probe %s: %w", a, err)
	}
	defer nc.Close()
	// Ends a read or write that waits when ctx is done, which then says why.
	stop := context.AfterFunc(ctx, func() { _ = nc.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if err := probe(nc, a.Export); err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%w)", err, ctx.Err())
		}
		return fmt.Errorf("probe %s: %w", a, err)
	}
	return nil
}

// probe runs Probe's handshake on nc.
func probe(nc net.Conn, export string) error {
	cc := &clientConn{nc: nc, br: bufio.NewReaderSize(nc, 4096)}
	var b [18]byte
	if _, err := io.ReadFull(cc.br, b[:]); err != nil {
		return fmt.Errorf("no greeting: %w", err)
	}
	if binary.BigEndian.Uint64(b[0:]) != magicInitPasswd || binary.BigEndian.Uint64(b[8:]) != magicIHaveOpt {
		return errors.New("not a newstyle NBD server")
	}
	hflags := binary.BigEndian.Uint16(b[16:])
	if hflags&flagFixedNewstyle == 0 {
		return nil // it answered; without fixed newstyle it takes no options but the export name
	}
	cflags := clientFlagFixedNewstyle
	if hflags&flagNoZeroes != 0 {
		cflags |= clientFlagNoZeroes
	}
	binary.BigEndian.PutUint32(b[:4], cflags)
	if _, err := nc.Write(b[:4]); err != nil {
		return err
	}
	data := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	data = append(data, export...)
	data = binary.BigEndian.AppendUint16(data, 0) // no information requests
	typ, msg, err := cc.option(optInfo, data, nil)
	if err != nil {
		return err
	}
	// Ends the handshake cleanly, so that the server logs nothing; its reply does not
	// matter.
	_ = cc.writeOption(optAbort, nil)
	if typ == repErrUnknown {
		if msg == "" {
			msg = fmt.Sprintf("no export named %q", export)
		}
		return fmt.Errorf("%s: %w", msg, ErrNoExport) // the server's message names it
	}
	return nil
}
