// Runs a wasm32-wasip1 test binary (cargo's test harness) under Node's WASI,
// so the logic crate's unit tests also run as WebAssembly: what only breaks
// inside wasm (panics in regex or parsing, memory, missing host functions)
// shows up here rather than in Envoy.
//
// Used as cargo's runner: CARGO_TARGET_WASM32_WASIP1_RUNNER="node run-wasi.mjs"
import { readFile } from "node:fs/promises";
import { WASI } from "node:wasi";
import process from "node:process";

const [wasmPath, ...args] = process.argv.slice(2);
const wasi = new WASI({
  version: "preview1",
  args: [wasmPath, ...args],
  env: { RUST_BACKTRACE: "0" },
  preopens: {},
  returnOnExit: true,
});
const module = await WebAssembly.compile(await readFile(wasmPath));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
let code;
try {
  code = wasi.start(instance);
} catch (e) {
  // A panic aborts the wasm instance (panic=abort on wasm32): a test failed.
  console.error(`wasm test binary trapped: ${e}`);
  code = 101;
}
process.exit(code);
