// Streams one completion from the mesh's Stream stage using only the .proto files,
// printing each chunk as a JSON line. Usage: node submit.js ADDRESS SESSION MAX_TOKENS INPUT
'use strict';
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { credentials, metadata } = require('./credentials');

const [address, session, maxTokens, input] = process.argv.slice(2);
const protos = path.resolve(__dirname, '..', '..', 'protos');
const definition = protoLoader.loadSync('orchestrator/v1/stages.proto', {
  includeDirs: [protos],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
});
const { orchestrator } = grpc.loadPackageDefinition(definition);
const client = new orchestrator.v1.StreamService(address, credentials());
const call = client.Submit(
  { session: { id: session }, input, params: { max_tokens: Number(maxTokens) } },
  metadata(),
  { deadline: Date.now() + 30000 },
);
call.on('data', (chunk) => process.stdout.write(JSON.stringify(chunk) + '\n'));
call.on('error', (err) => {
  process.stderr.write(`error ${err.code}: ${err.details}\n`);
  process.exit(2);
});
call.on('end', () => client.close());
