package nbd

import (
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
)

// Address is where an NBD server listens and which export to use.
type Address struct {
	Network string // "unix" or "tcp"
	Addr    string // socket path or host:port
	Export  string // export name; "" is the default export
}

// String returns the address as an NBD URI.
func (a Address) String() string {
	if a.Network == "unix" {
		u := url.URL{Scheme: "nbd+unix", Path: "/" + a.Export, RawQuery: "socket=" + url.QueryEscape(a.Addr)}
		return u.String()
	}
	u := url.URL{Scheme: "nbd", Host: a.Addr, Path: "/" + a.Export}
	return u.String()
}

// ParseAddress parses the forms a client accepts:
//   - "unix:PATH" and "tcp:HOST:PORT" (or "tcp:HOST", port 10809), the default export;
//   - NBD URIs (github.com/NetworkBlockDevice/nbd doc/uri.md): "nbd://HOST[:PORT]/EXPORT"
//     and "nbd+unix:///EXPORT?socket=PATH". TLS (nbds) is not supported.
func ParseAddress(s string) (Address, error) {
	switch {
	case strings.HasPrefix(s, "unix:") && !strings.HasPrefix(s, "unix://"):
		p := strings.TrimPrefix(s, "unix:")
		if p == "" {
			return Address{}, fmt.Errorf("address %q: empty socket path", s)
		}
		return Address{Network: "unix", Addr: p}, nil
	case strings.HasPrefix(s, "tcp:") && !strings.HasPrefix(s, "tcp://"):
		hp := strings.TrimPrefix(s, "tcp:")
		if hp == "" {
			return Address{}, fmt.Errorf("address %q: empty host", s)
		}
		if _, _, err := net.SplitHostPort(hp); err != nil {
			hp = net.JoinHostPort(strings.Trim(hp, "[]"), strconv.Itoa(DefaultPort))
		}
		return Address{Network: "tcp", Addr: hp}, nil
	case strings.Contains(s, "://"):
		return parseURI(s)
	default:
		return Address{}, fmt.Errorf("address %q: want unix:PATH, tcp:HOST:PORT, nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH", s)
	}
}

func parseURI(s string) (Address, error) {
	u, err := url.Parse(s)
	if err != nil {
		return Address{}, fmt.Errorf("address %q: %w", s, err)
	}
	export := strings.TrimPrefix(u.Path, "/")
	switch u.Scheme {
	case "nbd", "nbd+tcp":
		if u.Host == "" {
			return Address{}, fmt.Errorf("address %q: no host", s)
		}
		if len(u.Query()) != 0 {
			return Address{}, fmt.Errorf("address %q: query parameters are not supported for nbd://", s)
		}
		host, port := u.Hostname(), u.Port()
		if port == "" {
			port = strconv.Itoa(DefaultPort)
		}
		return Address{Network: "tcp", Addr: net.JoinHostPort(host, port), Export: export}, nil
	case "nbd+unix":
		if u.Host != "" {
			return Address{}, fmt.Errorf("address %q: nbd+unix takes no host (nbd+unix:///EXPORT?socket=PATH)", s)
		}
		q := u.Query()
		sock := q.Get("socket")
		if sock == "" {
			return Address{}, fmt.Errorf("address %q: nbd+unix needs ?socket=PATH", s)
		}
		for k := range q {
			if k != "socket" {
				return Address{}, fmt.Errorf("address %q: unsupported query parameter %q", s, k)
			}
		}
		return Address{Network: "unix", Addr: sock, Export: export}, nil
	case "nbds", "nbds+tcp", "nbds+unix":
		return Address{}, fmt.Errorf("address %q: TLS is not supported", s)
	default:
		return Address{}, fmt.Errorf("address %q: unknown scheme %q", s, u.Scheme)
	}
}
