// How the Node clients reach the mesh: plaintext, or TLS when TLS_CA is set (with TLS_CERT and TLS_KEY for an
// edge that asks clients for a certificate); an API key from TOKEN goes on every call as `authorization`.
'use strict';
const fs = require('fs');
const grpc = require('@grpc/grpc-js');

function credentials() {
  if (!process.env.TLS_CA) return grpc.credentials.createInsecure();
  const read = (name) => (process.env[name] ? fs.readFileSync(process.env[name]) : null);
  return grpc.credentials.createSsl(read('TLS_CA'), read('TLS_KEY'), read('TLS_CERT'));
}

function metadata() {
  const md = new grpc.Metadata();
  if (process.env.TOKEN) md.set('authorization', `Bearer ${process.env.TOKEN}`);
  return md;
}

module.exports = { credentials, metadata };
