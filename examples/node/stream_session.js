#!/usr/bin/env node
// Streams one rnnserve session from Node.js.
//
// Opens a session on a model, sends its steps one at a time on a StreamSteps stream (each
// step waits for the previous result, as a live client would), prints every step's outputs
// and position as one JSON line, and closes the session. Every call that names the session
// carries the `x-rnnserve-session-id` header, so behind Envoy all of them reach the replica
// that holds the session's state.
//
//   npm ci
//   node stream_session.js --target 127.0.0.1:50051 --steps steps.json [--session-id ID]
//
// steps.json: {"model": "tiny_lstm", "version": "", "input": "x", "steps": [[[0.1, ...]], ...]}
// where each step is one (T, features) array. The API is loaded from ../../proto at run time.

'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const SESSION_HEADER = 'x-rnnserve-session-id';
const DEADLINE_MS = 30000;

// Element size and the Buffer accessors of each DataType the example handles.
const DTYPES = {
  DATA_TYPE_FLOAT32: { size: 4, read: (b, o) => b.readFloatLE(o), write: (b, v, o) => b.writeFloatLE(v, o) },
  DATA_TYPE_FLOAT64: { size: 8, read: (b, o) => b.readDoubleLE(o), write: (b, v, o) => b.writeDoubleLE(v, o) },
  DATA_TYPE_INT32: { size: 4, read: (b, o) => b.readInt32LE(o), write: (b, v, o) => b.writeInt32LE(v, o) },
  DATA_TYPE_INT64: {
    size: 8,
    read: (b, o) => Number(b.readBigInt64LE(o)),
    write: (b, v, o) => b.writeBigInt64LE(BigInt(v), o),
  },
};

function parseArgs(argv) {
  const args = { target: '127.0.0.1:8080', steps: null, sessionId: null };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`missing value for ${flag}`);
    if (flag === '--target') args.target = value;
    else if (flag === '--steps') args.steps = value;
    else if (flag === '--session-id') args.sessionId = value;
    else throw new Error(`unknown flag ${flag}`);
  }
  if (!args.steps) throw new Error('--steps FILE is required');
  return args;
}

function loadService() {
  const definition = protoLoader.loadSync('rnnserve/v1/inference_service.proto', {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    longs: Number,
    enums: String,
    bytes: Buffer,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).rnnserve.v1.InferenceService;
}

// A nested array (e.g. (T, features)) as a rnnserve.v1.Tensor.
function encodeTensor(nested, dtype = 'DATA_TYPE_FLOAT32') {
  const shape = [];
  for (let level = nested; Array.isArray(level); level = level[0]) shape.push(level.length);
  const values = nested.flat(Infinity);
  const { size, write } = DTYPES[dtype];
  const data = Buffer.alloc(values.length * size);
  values.forEach((value, i) => write(data, value, i * size));
  return { dtype, shape, data };
}

// A rnnserve.v1.Tensor as {dtype, shape, values} with the values flat, row-major.
function decodeTensor(tensor) {
  const codec = DTYPES[tensor.dtype];
  if (!codec) throw new Error(`unsupported dtype ${tensor.dtype}`);
  const count = tensor.data.length / codec.size;
  const values = Array.from({ length: count }, (_, i) => codec.read(tensor.data, i * codec.size));
  return { dtype: tensor.dtype, shape: tensor.shape.map(Number), values };
}

function sessionMetadata(sessionId) {
  const metadata = new grpc.Metadata();
  metadata.set(SESSION_HEADER, sessionId);
  return metadata;
}

function deadline() {
  return new Date(Date.now() + DEADLINE_MS);
}

function unary(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: deadline() }, (error, reply) =>
      error ? reject(error) : resolve(reply));
  });
}

// Sends the steps one at a time on one stream; resolves with the results in order.
function streamSteps(client, sessionId, inputName, steps, onResult) {
  return new Promise((resolve, reject) => {
    const call = client.StreamSteps(sessionMetadata(sessionId), { deadline: deadline() });
    let next = 0;
    const send = () => {
      const step = {
        session_id: sessionId,
        inputs: { [inputName]: encodeTensor(steps[next]) },
        request_id: String(next),
      };
      next += 1;
      call.write({ steps: [step] });
    };
    call.on('data', (message) => {
      for (const result of message.results) {
        if (result.outcome !== 'response') {
          call.cancel();
          reject(new Error(`step ${result.request_id} failed: ${JSON.stringify(result.error)}`));
          return;
        }
        onResult(Number(result.request_id), result.response);
      }
      if (next < steps.length) send();
      else call.end();
    });
    call.on('error', reject);
    call.on('end', resolve);
    if (steps.length === 0) call.end();
    else send();
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const plan = JSON.parse(fs.readFileSync(args.steps, 'utf8'));
  const sessionId = args.sessionId || `node-${crypto.randomUUID()}`;
  const InferenceService = loadService();
  const client = new InferenceService(args.target, grpc.credentials.createInsecure());
  const metadata = () => sessionMetadata(sessionId);
  try {
    const opened = await unary(
      client,
      'OpenSession',
      { model: plan.model, version: plan.version || '', session_id: sessionId },
      metadata(),
    );
    console.error(`opened session ${opened.session.session_id} on ${plan.model}`);
    await streamSteps(client, sessionId, plan.input, plan.steps, (index, response) => {
      const outputs = {};
      for (const [name, tensor] of Object.entries(response.outputs)) {
        outputs[name] = decodeTensor(tensor);
      }
      console.log(JSON.stringify({ step: index, position: response.position, outputs }));
    });
    await unary(client, 'CloseSession', { session_id: sessionId }, metadata());
    console.error(`closed session ${sessionId}`);
  } finally {
    client.close();
  }
}

main().catch((error) => {
  console.error(`error: ${error.message}`);
  process.exit(1);
});
