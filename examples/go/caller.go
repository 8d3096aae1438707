// A Go caller of secrets-broker over mutual TLS.
//
// It reads a secret (GetSecret), the JWT config (GetJwtConfig), then opens
// WatchSecret, prints the first event and exits. The stubs are generated
// by ./build.sh from ../../proto, with Debian's protoc plugins.
//
// Environment:
//
//	BROKER_ENDPOINT    host:port of the broker (default 127.0.0.1:50051)
//	BROKER_CA_FILE     CA that signed the broker's certificate (PEM)
//	BROKER_CERT_FILE   this caller's certificate (PEM)
//	BROKER_KEY_FILE    this caller's private key (PEM)
//	BROKER_TLS_DOMAIN  name to expect in the broker's certificate (optional)
//	SECRET_NAME        secret to read and watch (default mistral-api-key)
//
// Without the three TLS files it connects in plaintext (loopback only).
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io/ioutil"
	"os"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	pb "secretsbroker/v1"
)

func env(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}

func dialOption() (grpc.DialOption, error) {
	ca, cert, key := os.Getenv("BROKER_CA_FILE"), os.Getenv("BROKER_CERT_FILE"), os.Getenv("BROKER_KEY_FILE")
	if ca == "" && cert == "" && key == "" {
		return grpc.WithInsecure(), nil
	}
	if ca == "" || cert == "" || key == "" {
		return nil, fmt.Errorf("mutual TLS needs BROKER_CA_FILE, BROKER_CERT_FILE and BROKER_KEY_FILE together")
	}
	pem, err := ioutil.ReadFile(ca)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s holds no PEM certificate", ca)
	}
	pair, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		return nil, err
	}
	config := &tls.Config{RootCAs: roots, Certificates: []tls.Certificate{pair}, ServerName: os.Getenv("BROKER_TLS_DOMAIN")}
	return grpc.WithTransportCredentials(credentials.NewTLS(config)), nil
}

// fail prints the status code, the broker's ErrorInfo reason (what to
// branch on, e.g. POLICY_DENIED or SECRET_NOT_FOUND) and the message.
func fail(err error) {
	if s, ok := status.FromError(err); ok {
		reason := ""
		for _, detail := range s.Details() {
			if info, ok := detail.(*errdetails.ErrorInfo); ok {
				reason = " " + info.GetReason()
			}
		}
		fmt.Fprintf(os.Stderr, "error: %s%s: %s\n", codeName(s.Code().String()), reason, s.Message())
	} else {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
	}
	os.Exit(1)
}

// codeName turns grpc-go's "PermissionDenied" into gRPC's "PERMISSION_DENIED".
func codeName(camel string) string {
	out := []rune{}
	for i, r := range camel {
		if i > 0 && r >= 'A' && r <= 'Z' {
			out = append(out, '_')
		}
		if r >= 'a' && r <= 'z' {
			r -= 'a' - 'A'
		}
		out = append(out, r)
	}
	return string(out)
}

func main() {
	name := env("SECRET_NAME", "mistral-api-key")
	option, err := dialOption()
	if err != nil {
		fail(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Not WithBlock: a broker that cannot be reached then fails the first
	// call with the reason (connection refused, a TLS failure), where a
	// blocking dial says only "context deadline exceeded".
	conn, err := grpc.Dial(env("BROKER_ENDPOINT", "127.0.0.1:50051"), option)
	if err != nil {
		fail(err)
	}
	defer conn.Close()
	client := pb.NewSecretsServiceClient(conn)

	got, err := client.GetSecret(ctx, &pb.GetSecretRequest{Name: name})
	if err != nil {
		fail(err)
	}
	secret := got.GetSecret()
	// An example prints the value to show it arrived; a service would not.
	value := secret.GetStringValue()
	if _, binary := secret.GetValue().(*pb.Secret_BinaryValue); binary {
		value = "<binary>"
	}
	fmt.Printf("GetSecret %s version=%s value=%s\n", secret.GetName(), secret.GetVersionId(), value)

	jwt, err := client.GetJwtConfig(ctx, &pb.GetJwtConfigRequest{})
	if err != nil {
		fail(err)
	}
	config := jwt.GetConfig()
	fmt.Printf("GetJwtConfig version=%s jwt_issuer=%s jwt_algorithm=%s expire_minutes=%d\n",
		jwt.GetVersionId(), config.GetJwtIssuer(), config.GetJwtAlgorithm(), config.GetJwtAccessTokenExpireMinutes())

	stream, err := client.WatchSecret(ctx, &pb.WatchSecretRequest{Name: name})
	if err != nil {
		fail(err)
	}
	event, err := stream.Recv()
	if err != nil {
		fail(err)
	}
	fmt.Printf("WatchSecret %s %s version=%s\n", event.GetSecret().GetName(), event.GetType().String(), event.GetSecret().GetVersionId())
}
