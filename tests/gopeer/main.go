// Command gopeer is the test suite's oracle: it judges a certificate the way Nomad's Go code
// does, by real crypto/tls handshakes configured as Nomad configures them (helper/tlsutil
// config.go: TLS >= 1.2, client certificates required and verified, ServerName
// server.<region>.nomad or client.<region>.nomad) plus Nomad's own checks on the peer
// (nomad/server.go rpcNameAndRegionValidator, nomad/rpc.go validateRaftTLS) and at agent start
// (helper/tlsutil ParseCiphers: RSA or ECDSA keys only).
//
// It reads a JSON list of cases on stdin and prints one JSON verdict per case and role. Each
// role's connections are made against reference peers from an in-memory CA that the candidate's
// side also trusts, so only the candidate's certificate is on trial. Standard library only.
//
// `gopeer rpc-pair` judges no candidate against reference peers: it connects two real agents'
// files (a server's RPC listener of one region, and a dialer of any region) and reports what
// each side saw, so a test can show which cross-region RPC connections Nomad allows.
package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"strings"
	"sync"
	"time"
)

// Case is one certificate on trial, in one role.
type Case struct {
	Name   string `json:"name"`
	CA     string `json:"ca"`
	Cert   string `json:"cert"`
	Key    string `json:"key"`
	Role   string `json:"role"`
	Region string `json:"region"`
}

// Check is one connection or check, what Nomad needs of it, and what happened.
type Check struct {
	Name  string `json:"name"`
	Must  string `json:"must"` // "succeed", "fail" (an agent must refuse it), or "note"
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

// Verdict is what the oracle says about one case in one role.
type Verdict struct {
	Name    string  `json:"name"`
	Role    string  `json:"role"`
	Verdict string  `json:"verdict"` // "accept" or "refuse"
	Rule    string  `json:"rule,omitempty"`
	Error   string  `json:"error,omitempty"`
	Checks  []Check `json:"checks"`
}

// nomadCiphers is helper/tlsutil's defaultTLSCiphers (TLS 1.2; TLS 1.3 suites are fixed).
var nomadCiphers = []uint16{
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305,
	tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305,
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
}

// rpcNameAndRegionValidator is nomad/server.go's, verbatim in behaviour.
func rpcNameAndRegionValidator(region string) func([][]byte, [][]*x509.Certificate) error {
	return func(_ [][]byte, certificates [][]*x509.Certificate) error {
		if len(certificates) > 0 && len(certificates[0]) > 0 {
			cert := certificates[0][0]
			for _, dnsName := range cert.DNSNames {
				if validateRPCRegionPeer(dnsName, region) {
					return nil
				}
			}
			if validateRPCRegionPeer(cert.Subject.CommonName, region) {
				return nil
			}
		}
		return errors.New("invalid role or region for certificate")
	}
}

func validateRPCRegionPeer(name, region string) bool {
	parts := strings.Split(name, ".")
	if len(parts) < 3 {
		return false
	}
	if parts[len(parts)-1] != "nomad" {
		return false
	}
	if parts[0] == "client" {
		return name == "client."+region+".nomad"
	}
	return parts[0] == "server"
}

// validateRaftTLS is nomad/rpc.go's ValidateCertificateForName: exact CN or DNS SAN.
func validateRaftTLS(cert *x509.Certificate, region string) error {
	expected := "server." + region + ".nomad"
	valid := append([]string{cert.Subject.CommonName}, cert.DNSNames...)
	for _, name := range valid {
		if name == expected {
			return nil
		}
	}
	return fmt.Errorf("invalid certificate, %s not in %s", expected, strings.Join(valid, ","))
}

// --- the reference peers: an in-memory CA the candidate's side trusts as well ---

type refPKI struct {
	ca    *x509.Certificate
	key   crypto.Signer
	peers map[string]tls.Certificate
	mu    sync.Mutex
}

func newRef() *refPKI {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "gopeer reference CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		panic(err)
	}
	ca, _ := x509.ParseCertificate(der)
	return &refPKI{ca: ca, key: key, peers: map[string]tls.Certificate{}}
}

// peer is a correct certificate for role in region, as cfwrap makes them.
func (r *refPKI) peer(role, region string) tls.Certificate {
	r.mu.Lock()
	defer r.mu.Unlock()
	id := role + "/" + region
	if c, ok := r.peers[id]; ok {
		return c
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	name := role + "." + region + ".nomad"
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(int64(len(r.peers) + 2)),
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     []string{name, "localhost"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, r.ca, key.Public(), r.key)
	if err != nil {
		panic(err)
	}
	c := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	r.peers[id] = c
	return c
}

// --- handshakes over an in-process pipe ---

type outcome struct {
	serverErr, clientErr error
	serverState          tls.ConnectionState
}

func (o outcome) err() error {
	if o.clientErr != nil {
		return o.clientErr
	}
	return o.serverErr
}

// judgedByServer prefers the server's own error: it is the side that judged the candidate.
func (o outcome) judgedByServer() error {
	if o.serverErr != nil {
		return o.serverErr
	}
	return o.clientErr
}

// handshake runs a TLS handshake over loopback TCP and a one-byte echo (under TLS 1.3 a client
// sees its handshake finish before the server has judged its certificate).
func handshake(server, client *tls.Config) outcome {
	var out outcome
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		out.clientErr = err
		return out
	}
	defer listener.Close()
	deadline := time.Now().Add(10 * time.Second)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		conn, err := listener.Accept()
		if err != nil {
			out.serverErr = err
			return
		}
		_ = conn.SetDeadline(deadline)
		s := tls.Server(conn, server)
		defer s.Close()
		if err := s.Handshake(); err != nil {
			out.serverErr = err
			return
		}
		buf := make([]byte, 1)
		if _, err := s.Read(buf); err != nil {
			out.serverErr = err
			return
		}
		if _, err := s.Write(buf); err != nil {
			out.serverErr = err
		}
		out.serverState = s.ConnectionState()
	}()
	func() {
		conn, err := net.DialTimeout("tcp", listener.Addr().String(), 10*time.Second)
		if err != nil {
			out.clientErr = err
			return
		}
		_ = conn.SetDeadline(deadline)
		c := tls.Client(conn, client)
		defer c.Close()
		if err := c.Handshake(); err != nil {
			out.clientErr = err
			return
		}
		if _, err := c.Write([]byte{'!'}); err != nil {
			out.clientErr = err
			return
		}
		buf := make([]byte, 1)
		if _, err := c.Read(buf); err != nil {
			out.clientErr = err
		}
	}()
	wg.Wait()
	return out
}

func clean(err error) string {
	if err == nil {
		return ""
	}
	return strings.ReplaceAll(err.Error(), "\n", " ")
}

// --- judging one case in one role ---

type judge struct {
	ref *refPKI
	c   Case
	// leaf is the candidate as Nomad loads it (cert_file, key_file).
	leaf tls.Certificate
	// casePool is ca_file as the reference side reads it; bothPool adds the reference CA for the
	// candidate's side, so that only the candidate's certificate is on trial.
	casePool, bothPool *x509.CertPool
	checks             []Check
}

func (j *judge) add(name, must string, err error) bool {
	j.checks = append(j.checks, Check{Name: name, Must: must, OK: err == nil, Error: clean(err)})
	return err == nil
}

func (j *judge) base(role string) *tls.Config {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if role != "cli" {
		cfg.CipherSuites = nomadCiphers
	}
	return cfg
}

// candidateServes: the candidate serves; a reference peer of peerRole dials serverName.
func (j *judge) candidateServes(peerRole, serverName string, validate bool) outcome {
	server := j.base(j.c.Role)
	server.Certificates = []tls.Certificate{j.leaf}
	server.ClientAuth = tls.RequireAndVerifyClientCert
	server.ClientCAs = j.bothPool
	if validate {
		server.VerifyPeerCertificate = rpcNameAndRegionValidator(j.c.Region)
	}
	client := j.base(peerRole)
	client.Certificates = []tls.Certificate{j.ref.peer(peerRole, j.c.Region)}
	client.RootCAs = j.casePool
	client.ServerName = serverName
	return handshake(server, client)
}

// candidateDials: the candidate dials a reference server that verifies it against ca_file.
func (j *judge) candidateDials(rpc bool) outcome {
	server := j.base("server")
	server.Certificates = []tls.Certificate{j.ref.peer("server", j.c.Region)}
	server.ClientAuth = tls.RequireAndVerifyClientCert
	server.ClientCAs = j.casePool
	if rpc {
		server.VerifyPeerCertificate = rpcNameAndRegionValidator(j.c.Region)
	}
	client := j.base(j.c.Role)
	// As Nomad's KeyLoader.GetClientCertificate: always present the configured certificate.
	client.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		return &j.leaf, nil
	}
	client.RootCAs = j.bothPool
	client.ServerName = "server." + j.c.Region + ".nomad"
	return handshake(server, client)
}

// issueUnder: a certificate signed by the candidate's key, verified against ca_file with the
// candidate as its intermediate. It must fail, or every holder of the key can mint any role.
func (j *judge) issueUnder() error {
	parent, err := x509.ParseCertificate(j.leaf.Certificate[0])
	if err != nil {
		return err
	}
	signer, ok := j.leaf.PrivateKey.(crypto.Signer)
	if !ok {
		return errors.New("the key cannot sign")
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	name := "server." + j.c.Region + ".nomad"
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(7),
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		DNSNames:     []string{name},
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), signer)
	if err != nil {
		return err
	}
	child, err := x509.ParseCertificate(der)
	if err != nil {
		return err
	}
	intermediates := x509.NewCertPool()
	for _, raw := range j.leaf.Certificate {
		if c, err := x509.ParseCertificate(raw); err == nil {
			intermediates.AddCert(c)
		}
	}
	_, err = child.Verify(x509.VerifyOptions{
		Roots: j.casePool, Intermediates: intermediates,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	return err
}

func (j *judge) raft(dial outcome) error {
	if dial.judgedByServer() != nil {
		return fmt.Errorf("no verified RPC connection: %v", clean(dial.judgedByServer()))
	}
	chains := dial.serverState.VerifiedChains
	if len(chains) == 0 || len(chains[0]) == 0 {
		return errors.New("missing certificate information")
	}
	return validateRaftTLS(chains[0][0], j.c.Region)
}

// load does what an agent (or the CLI, api.ConfigureTLS) does with its files at start.
func (j *judge) load() error {
	caPEM, err := os.ReadFile(j.c.CA)
	if err != nil {
		return fmt.Errorf("Failed to read CA file: %v", err)
	}
	j.casePool = x509.NewCertPool()
	if !j.casePool.AppendCertsFromPEM(caPEM) {
		return fmt.Errorf("Failed to parse any valid certificates in CA file: %s", j.c.CA)
	}
	j.bothPool = x509.NewCertPool()
	j.bothPool.AppendCertsFromPEM(caPEM)
	j.bothPool.AddCert(j.ref.ca)
	j.leaf, err = tls.LoadX509KeyPair(j.c.Cert, j.c.Key)
	if err != nil {
		return fmt.Errorf("Failed to load cert/key pair: %v", err)
	}
	// Go >= 1.24 (Nomad builds with 1.26) refuses RSA keys under 1024 bits in crypto/rsa; this
	// oracle may run on an older Go, so it applies that rule itself.
	if key, ok := j.leaf.PrivateKey.(*rsa.PrivateKey); ok && key.N.BitLen() < 1024 {
		return fmt.Errorf("crypto/rsa: %d-bit keys are insecure", key.N.BitLen())
	}
	if j.c.Role != "cli" {
		// helper/tlsutil ParseCiphers -> getSignatureAlgorithm: an agent will not start.
		switch key := j.leaf.PrivateKey.(type) {
		case *rsa.PrivateKey, *ecdsa.PrivateKey:
		default:
			return fmt.Errorf("Unsupported signature algorithm %T; RSA and ECDSA only are supported.", key)
		}
	}
	return nil
}

func (j *judge) run() Verdict {
	region := j.c.Region
	if j.add("load", "succeed", j.load()) {
		switch j.c.Role {
		case "server":
			j.add("rpc-serve", "succeed", j.candidateServes("client", "server."+region+".nomad", true).err())
			dial := j.candidateDials(true)
			j.add("rpc-dial", "succeed", dial.judgedByServer())
			j.add("raft", "succeed", j.raft(dial))
			j.add("pose-as-client-agent", "fail", j.candidateServes("cli", "client."+region+".nomad", false).err())
			j.add("https-localhost", "note", j.candidateServes("cli", "localhost", false).err())
			j.add("https-127.0.0.1", "note", j.candidateServes("cli", "127.0.0.1", false).err())
		case "client":
			dial := j.candidateDials(true)
			j.add("rpc-dial", "succeed", dial.judgedByServer())
			j.add("api-serve", "succeed", j.candidateServes("cli", "client."+region+".nomad", false).err())
			j.add("raft", "fail", j.raft(dial))
			j.add("pose-as-server", "fail", j.candidateServes("client", "server."+region+".nomad", true).err())
			j.add("https-localhost", "note", j.candidateServes("cli", "localhost", false).err())
			j.add("https-127.0.0.1", "note", j.candidateServes("cli", "127.0.0.1", false).err())
		case "cli":
			j.add("https-dial", "succeed", j.candidateDials(false).judgedByServer())
			j.add("rpc-dial", "fail", j.candidateDials(true).judgedByServer())
			j.add("pose-as-server", "fail", j.candidateServes("client", "server."+region+".nomad", true).err())
			j.add("pose-as-client-agent", "fail", j.candidateServes("cli", "client."+region+".nomad", false).err())
		default:
			j.add("role", "succeed", fmt.Errorf("unknown role %q", j.c.Role))
		}
		j.add("issue-under", "fail", j.issueUnder())
	}
	v := Verdict{Name: j.c.Name, Role: j.c.Role, Verdict: "accept", Checks: j.checks}
	for _, check := range j.checks {
		if check.Must == "succeed" && !check.OK {
			v.Verdict, v.Rule, v.Error = "refuse", check.Name, check.Error
			break
		}
		if check.Must == "fail" && check.OK {
			v.Verdict, v.Rule = "refuse", check.Name
			v.Error = "a Nomad agent accepts this certificate for " + check.Name
			break
		}
	}
	return v
}

// Side is one real agent's files, as its agent configuration names them, and its region.
type Side struct {
	CA     string `json:"ca"`
	Cert   string `json:"cert"`
	Key    string `json:"key"`
	Region string `json:"region"`
}

// Pair is one RPC connection between two real agents: Dialer dials Listener's region.
type Pair struct {
	Name     string `json:"name"`
	Listener Side   `json:"listener"`
	Dialer   Side   `json:"dialer"`
}

// PairVerdict is what happened on that connection, as each side saw it.
type PairVerdict struct {
	Name        string `json:"name"`
	OK          bool   `json:"ok"`
	ServerError string `json:"server_error,omitempty"`
	ClientError string `json:"client_error,omitempty"`
	// RaftError is validateRaftTLS on the dialer's verified certificate (empty: it passes).
	RaftError string `json:"raft_error,omitempty"`
}

func loadSide(s Side) (tls.Certificate, *x509.CertPool, error) {
	caPEM, err := os.ReadFile(s.CA)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return tls.Certificate{}, nil, fmt.Errorf("no certificate in %s", s.CA)
	}
	leaf, err := tls.LoadX509KeyPair(s.Cert, s.Key)
	return leaf, pool, err
}

// rpcPair runs one connection with no reference peer: the listener is configured as a Nomad
// server's RPC listener in its region (nomad/server.go getTLSConf: IncomingTLSConfig with
// VerifyPeerCertificate = rpcNameAndRegionValidator(region) under verify_server_hostname), the
// dialer as Nomad's outgoing RPC to that region (helper/tlsutil OutgoingTLSWrapper: ServerName
// server.<target region>.nomad, the configured certificate always presented).
func rpcPair(p Pair) PairVerdict {
	v := PairVerdict{Name: p.Name}
	lLeaf, lPool, err := loadSide(p.Listener)
	if err != nil {
		v.ServerError = clean(err)
		return v
	}
	dLeaf, dPool, err := loadSide(p.Dialer)
	if err != nil {
		v.ClientError = clean(err)
		return v
	}
	server := &tls.Config{MinVersion: tls.VersionTLS12, CipherSuites: nomadCiphers}
	server.Certificates = []tls.Certificate{lLeaf}
	server.ClientAuth = tls.RequireAndVerifyClientCert
	server.ClientCAs = lPool
	server.VerifyPeerCertificate = rpcNameAndRegionValidator(p.Listener.Region)
	client := &tls.Config{MinVersion: tls.VersionTLS12, CipherSuites: nomadCiphers}
	client.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		return &dLeaf, nil
	}
	client.RootCAs = dPool
	client.ServerName = "server." + p.Listener.Region + ".nomad"
	out := handshake(server, client)
	v.ServerError, v.ClientError = clean(out.serverErr), clean(out.clientErr)
	v.OK = out.err() == nil
	if v.OK {
		chains := out.serverState.VerifiedChains
		if len(chains) == 0 || len(chains[0]) == 0 {
			v.RaftError = "missing certificate information"
		} else {
			v.RaftError = clean(validateRaftTLS(chains[0][0], p.Listener.Region))
		}
	}
	return v
}

// pairsMain is `gopeer rpc-pair`: a JSON list of pairs on stdin, a JSON list of verdicts out.
func pairsMain() {
	var pairs []Pair
	if err := json.NewDecoder(os.Stdin).Decode(&pairs); err != nil {
		fmt.Fprintf(os.Stderr, "gopeer: reading pairs from stdin: %v\n", err)
		os.Exit(2)
	}
	verdicts := make([]PairVerdict, len(pairs))
	for i, p := range pairs {
		verdicts[i] = rpcPair(p)
	}
	out := json.NewEncoder(os.Stdout)
	out.SetIndent("", "  ")
	if err := out.Encode(verdicts); err != nil {
		os.Exit(1)
	}
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "rpc-pair" {
		pairsMain()
		return
	}
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		fmt.Fprintf(os.Stderr, "gopeer: reading cases from stdin: %v\n", err)
		os.Exit(2)
	}
	ref := newRef()
	verdicts := make([]Verdict, len(cases))
	var wg sync.WaitGroup
	sem := make(chan struct{}, 4)
	for i, c := range cases {
		wg.Add(1)
		go func(i int, c Case) {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			j := &judge{ref: ref, c: c}
			verdicts[i] = j.run()
		}(i, c)
	}
	wg.Wait()
	out := json.NewEncoder(os.Stdout)
	out.SetIndent("", "  ")
	if err := out.Encode(verdicts); err != nil {
		os.Exit(1)
	}
}
