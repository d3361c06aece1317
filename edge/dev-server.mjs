// Runs one Keyward worker (an edge region or the home of the Durable Objects) on this machine:
// wrangler's local dev server, the engine behind `wrangler dev`, started through wrangler's own
// `unstable_startWorker` API so that the devtools inspector can be left off. `wrangler dev`
// always attaches it, and it reports every subrequest (each Durable Object call) to the wrangler
// Node.js process: measured on 2 cores, that made one authority update cost 20 ms of CPU
// instead of 8. Everything else (workerd, KV, Cache API, Durable Objects, the dev registry,
// `.dev.vars`) is what `wrangler dev --local` runs.
//
//   node edge/dev-server.mjs --config <wrangler.toml> --port <port> --persist-to <dir>
//        --registry <dir> [--log-level warn] [--inspect]
//
// Stops cleanly on SIGINT or SIGTERM.

import { parseArgs } from "node:util";
import { unstable_startWorker } from "wrangler";

const { values: args } = parseArgs({
  options: {
    config: { type: "string" },
    port: { type: "string" },
    "persist-to": { type: "string" },
    registry: { type: "string" },
    "log-level": { type: "string", default: "warn" },
    inspect: { type: "boolean", default: false },
  },
});
for (const name of ["config", "port", "persist-to", "registry"]) {
  if (!args[name]) {
    console.error(`dev-server: --${name} is required`);
    process.exit(2);
  }
}

const worker = await unstable_startWorker({
  config: args.config,
  dev: {
    remote: false,
    server: { hostname: "127.0.0.1", port: Number(args.port) },
    inspector: args.inspect ? {} : false,
    persist: args["persist-to"],
    registry: args.registry,
    logLevel: args["log-level"],
    watch: false,
    liveReload: false,
  },
});
await worker.ready;
console.log(`ready on ${(await worker.url).href}`);

let stopping = false;
for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, async () => {
    if (stopping) return;
    stopping = true;
    await worker.dispose();
    process.exit(0);
  });
}
