// Calling clemserve from Node.js: the proto is loaded at run time, nothing is generated.
//
//   node client.js [HOST:PORT]      (default: CLEMSERVE_ADDRESS, else localhost:50051)
//
// It lists the server's models, asks the echo model for a reply, and reads the structured context
// error (OUT_OF_RANGE with a clemserve.v1.ContextLimit detail) that a too-long request gets.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "proto");
const address = process.argv[2] || process.env.CLEMSERVE_ADDRESS || "localhost:50051";

const definition = protoLoader.loadSync("clemserve/v1/clemserve.proto", {
  includeDirs: [PROTO_ROOT],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
});
const clemserve = grpc.loadPackageDefinition(definition).clemserve.v1;
const client = new clemserve.ModelService(address, grpc.credentials.createInsecure());

// google.rpc.Status, the message inside the grpc-status-details-bin trailer (only what we read)
const rpc = protobuf.parse(`
  syntax = "proto3";
  package google.rpc;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
`, { keepCase: true }).root;
const contextLimit = new protobuf.Root()
  .loadSync(path.join(PROTO_ROOT, "clemserve/v1/clemserve.proto"), { keepCase: true })
  .lookupType("clemserve.v1.ContextLimit");
const errorInfo = rpc.lookupType("google.rpc.ErrorInfo");

function call(method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 30000 }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

// The structured details of a failed call, by type name.
function details(err) {
  const blob = err.metadata && err.metadata.get("grpc-status-details-bin")[0];
  if (!blob) return {};
  const status = rpc.lookupType("google.rpc.Status").decode(blob);
  const found = {};
  for (const any of status.details) {
    const name = any.type_url.split("/").pop();
    if (name === "clemserve.v1.ContextLimit") found[name] = contextLimit.toObject(contextLimit.decode(any.value));
    if (name === "google.rpc.ErrorInfo") found[name] = errorInfo.toObject(errorInfo.decode(any.value));
  }
  return found;
}

async function main() {
  const listed = await call("ListModels", {});
  console.log(`models: ${listed.models.map((m) => JSON.parse(m.model_spec.json).model_name).join(", ")}`);

  const messages = [{ role: "user", content: "Hello from Node.js" }];
  const reply = await call("Generate", { model: { name: "echo" }, messages, args: { temperature: 0, max_tokens: 50 } });
  const response = JSON.parse(reply.response_json);
  console.log(`echo: ${reply.response_text}`);
  console.log(`clem_player.model_name: ${response.clem_player.model_name}`);
  console.log(`finish_reason: ${reply.finish_reason}`);

  try {
    // echo counts words: 70,001 prompt words plus 65,536 new tokens do not fit its 131,072
    const long = [{ role: "user", content: "word ".repeat(70000) }];
    await call("Generate", { model: { name: "echo" }, messages: long, args: { max_tokens: 65536 } });
    console.log("context error: none (unexpected)");
    process.exitCode = 1;
  } catch (err) {
    const found = details(err);
    const limit = found["clemserve.v1.ContextLimit"];
    console.log(`context error: ${grpc.status[err.code]} ${err.details}`);
    console.log(`tokens_used=${limit.tokens_used} tokens_left=${limit.tokens_left} context_size=${limit.context_size}`);
    console.log(`reason: ${found["google.rpc.ErrorInfo"].reason}`);
  }
  client.close();
}

main().catch((err) => {
  console.error(`clemserve call failed: ${err.message}`);
  process.exit(1);
});
