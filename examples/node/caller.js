#!/usr/bin/env node
// A Node caller of secrets-broker over mutual TLS.
//
// It reads a secret (GetSecret), the JWT config (GetJwtConfig), then opens
// WatchSecret, prints the first event and exits. The stubs are made at run
// time from proto/ by @grpc/proto-loader; calls go through @grpc/grpc-js.
//
// Environment:
//   BROKER_ENDPOINT    host:port of the broker (default 127.0.0.1:50051)
//   BROKER_CA_FILE     CA that signed the broker's certificate (PEM)
//   BROKER_CERT_FILE   this caller's certificate (PEM)
//   BROKER_KEY_FILE    this caller's private key (PEM)
//   BROKER_TLS_DOMAIN  name to expect in the broker's certificate (optional)
//   SECRET_NAME        secret to read and watch (default mistral-api-key)
//   PROTO_DIR          the contract (default ../../proto)
// Without the three TLS files it connects in plaintext (loopback only, e.g.
// `secrets-broker serve --dev`).
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const env = (name, fallback) => process.env[name] || fallback;

const PROTO_DIR = env('PROTO_DIR', path.resolve(__dirname, '..', '..', 'proto'));

function loadContract() {
  const definition = protoLoader.loadSync('secretsbroker/v1/secrets_service.proto', {
    includeDirs: [PROTO_DIR],
    keepCase: true, // field names as in the .proto: version_id, jwt_issuer
    longs: String,
    enums: String, // WATCH_EVENT_TYPE_CURRENT, not 1
    defaults: true,
    oneofs: true, // secret.value says which of string_value / binary_value is set
  });
  return grpc.loadPackageDefinition(definition).secretsbroker.v1;
}

function credentialsAndOptions() {
  // The broker is reached directly, never through an HTTP proxy.
  const options = { 'grpc.enable_http_proxy': 0 };
  const files = ['BROKER_CA_FILE', 'BROKER_CERT_FILE', 'BROKER_KEY_FILE'].map((n) => env(n));
  if (files.every((f) => !f)) {
    return [grpc.credentials.createInsecure(), options];
  }
  if (!files.every((f) => f)) {
    throw new Error('mutual TLS needs BROKER_CA_FILE, BROKER_CERT_FILE and BROKER_KEY_FILE together');
  }
  const [ca, cert, key] = files.map((f) => fs.readFileSync(f));
  const domain = env('BROKER_TLS_DOMAIN');
  if (domain) {
    options['grpc.ssl_target_name_override'] = domain;
    options['grpc.default_authority'] = domain;
  }
  return [grpc.credentials.createSsl(ca, key, cert), options];
}

// What an error's grpc-status-details-bin trailer is: google.rpc.Status,
// whose details are google.protobuf.Any. Only the fields read here are
// declared, with their field numbers in those messages.
const statusDetails = protobuf.parse(
  `syntax = "proto3";
   message Any { string type_url = 1; bytes value = 2; }
   message Status { repeated Any details = 3; }
   message ErrorInfo { string reason = 1; }`,
  { keepCase: true },
).root;

// The broker's google.rpc.ErrorInfo reason (what to branch on, e.g.
// POLICY_DENIED or SECRET_NOT_FOUND), or '' when the error has none.
function reasonOf(error) {
  const [bytes] = error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  if (!bytes) return '';
  const status = statusDetails.lookupType('Status').decode(bytes);
  const info = status.details.find((d) => d.type_url.endsWith('/google.rpc.ErrorInfo'));
  return info ? statusDetails.lookupType('ErrorInfo').decode(info.value).reason : '';
}

// A unary call as a promise, with a deadline.
function call(client, method, request) {
  const deadline = new Date(Date.now() + 10_000);
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

// The first event of WatchSecret, then the stream is cancelled.
function firstWatchEvent(client, name) {
  return new Promise((resolve, reject) => {
    const stream = client.WatchSecret({ name });
    stream.once('data', (event) => {
      resolve(event);
      stream.cancel();
    });
    stream.on('error', (error) => {
      if (error.code !== grpc.status.CANCELLED) reject(error);
    });
    stream.on('end', () => reject(new Error('WatchSecret ended before its first event')));
  });
}

async function main() {
  const v1 = loadContract();
  const [credentials, options] = credentialsAndOptions();
  const client = new v1.SecretsService(env('BROKER_ENDPOINT', '127.0.0.1:50051'), credentials, options);
  const name = env('SECRET_NAME', 'mistral-api-key');
  try {
    const { secret } = await call(client, 'GetSecret', { name });
    // An example prints the value to show it arrived; a service would not.
    const value = secret.value === 'string_value' ? secret.string_value : '<binary>';
    console.log(`GetSecret ${secret.name} version=${secret.version_id} value=${value}`);

    const jwt = await call(client, 'GetJwtConfig', {});
    console.log(
      `GetJwtConfig version=${jwt.version_id} jwt_issuer=${jwt.config.jwt_issuer} ` +
        `jwt_algorithm=${jwt.config.jwt_algorithm} expire_minutes=${jwt.config.jwt_access_token_expire_minutes}`,
    );

    const event = await firstWatchEvent(client, name);
    console.log(`WatchSecret ${event.secret.name} ${event.type} version=${event.secret.version_id}`);
  } finally {
    client.close();
  }
}

main().catch((error) => {
  // grpc-js errors carry the status code; the broker's ErrorInfo is in
  // error.metadata ('grpc-status-details-bin').
  const code = error.code !== undefined ? `${grpc.status[error.code]}` : '';
  const label = [code, reasonOf(error)].filter((part) => part).join(' ');
  console.error(`error: ${label ? `${label}: ` : ''}${error.details || error.message}`);
  process.exit(1);
});
