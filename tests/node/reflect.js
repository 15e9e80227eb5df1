// Discovers the mesh through server reflection alone (no .proto files) with the given reflection API version
// (v1 or v1alpha), then streams one completion through the service it found, printing a JSON summary.
// Usage: node reflect.js ADDRESS VERSION
'use strict';
const { GrpcReflection } = require('grpc-js-reflection-client');
const { credentials, metadata } = require('./credentials');

const [address, version] = process.argv.slice(2);

(async () => {
  const reflection = new GrpcReflection(address, credentials(), {}, version);
  const services = await reflection.listServices();
  const descriptor = await reflection.getDescriptorBySymbol('orchestrator.v1.StreamService');
  const pkg = descriptor.getPackageObject({ keepCase: true, longs: Number, enums: String, defaults: true });
  const client = new pkg.orchestrator.v1.StreamService(address, credentials());
  const call = client.Submit(
    { session: { id: 'node-reflection' }, input: 'What is reflection?', params: { max_tokens: 5 } },
    metadata(),
    { deadline: Date.now() + 30000 },
  );
  let text = '';
  let tokens = 0;
  call.on('data', (chunk) => {
    text += chunk.text;
    if (chunk.completion) tokens = chunk.completion.usage.completion_tokens;
  });
  call.on('error', (err) => {
    process.stderr.write(`error ${err.code}: ${err.details}\n`);
    process.exit(2);
  });
  call.on('end', () => {
    process.stdout.write(JSON.stringify({ services, text, tokens }) + '\n');
    client.close();
    reflection.client.close();
  });
})().catch((err) => {
  process.stderr.write(`reflection failed: ${err}\n`);
  process.exit(3);
});
