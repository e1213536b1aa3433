// Reference x402 facilitator for comparison benchmarks.
//
// A plain HTTP facilitator built only from the published x402 packages:
// `x402Facilitator` from @x402/core with the EVM `exact` scheme from
// @x402/evm registered for eip155:31337, backed by a viem wallet+public client
// on a local anvil chain. Every request goes through the packages' normal
// facilitator path (x402Facilitator.verify / settle / getSupported); nothing
// is cached or short-circuited here.
//
// Routes (the shape @x402/core's HTTPFacilitatorClient speaks):
//   POST /verify   {x402Version, paymentPayload, paymentRequirements} -> VerifyResponse
//   POST /settle   {x402Version, paymentPayload, paymentRequirements} -> SettleResponse
//   GET  /supported                                                   -> SupportedResponse
// Any `authorization` header is ignored.
//
// Environment:
//   RPC_URL          anvil JSON-RPC URL (chain id 31337), required
//   FACILITATOR_KEY  0x private key of the facilitator signer
//                    (default: anvil account 0)
//   PORT             listen port on 127.0.0.1 (default 0 = any free port)
//
// Prints exactly one line to stdout once bound:
//   listening http://127.0.0.1:PORT
// and serves until SIGTERM / SIGINT.

import express from "express";
import { createWalletClient, http, publicActions } from "viem";
import { privateKeyToAccount } from "viem/accounts";
import { anvil } from "viem/chains";
import { x402Facilitator } from "@x402/core/facilitator";
import { toFacilitatorEvmSigner } from "@x402/evm";
import { ExactEvmScheme } from "@x402/evm/exact/facilitator";

const NETWORK = "eip155:31337";
const DEFAULT_FACILITATOR_KEY =
  "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

const rpcUrl = process.env.RPC_URL;
if (!rpcUrl) {
  process.stderr.write("reference-facilitator: RPC_URL is required\n");
  process.exit(2);
}
const facilitatorKey = process.env.FACILITATOR_KEY || DEFAULT_FACILITATOR_KEY;
const port = Number(process.env.PORT ?? 0);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  process.stderr.write(`reference-facilitator: bad PORT ${process.env.PORT}\n`);
  process.exit(2);
}

// viem chain definition for anvil (id 31337), pointed at RPC_URL.
const chain = {
  ...anvil,
  rpcUrls: { default: { http: [rpcUrl] } },
};

const account = privateKeyToAccount(facilitatorKey);
const client = createWalletClient({
  account,
  chain,
  transport: http(rpcUrl),
}).extend(publicActions);

// FacilitatorEvmSigner over the viem client, as the package documents it.
const signer = toFacilitatorEvmSigner({
  address: account.address,
  getCode: (args) => client.getCode(args),
  readContract: (args) => client.readContract({ ...args, args: args.args ?? [] }),
  verifyTypedData: (args) => client.verifyTypedData(args),
  writeContract: (args) => client.writeContract({ ...args, args: args.args ?? [] }),
  sendTransaction: (args) => client.sendTransaction(args),
  waitForTransactionReceipt: (args) => client.waitForTransactionReceipt(args),
});

const facilitator = new x402Facilitator().register(NETWORK, new ExactEvmScheme(signer));

function errorMessage(err) {
  return err instanceof Error ? err.message : String(err);
}

// Pulls {paymentPayload, paymentRequirements} out of a facilitator request
// body; returns null when either is missing.
function readRequest(body) {
  if (body === null || typeof body !== "object") return null;
  const { paymentPayload, paymentRequirements } = body;
  if (
    paymentPayload === null ||
    typeof paymentPayload !== "object" ||
    paymentRequirements === null ||
    typeof paymentRequirements !== "object"
  ) {
    return null;
  }
  return { paymentPayload, paymentRequirements };
}

const app = express();
app.disable("x-powered-by");
app.disable("etag");
app.use(express.json({ limit: "1mb" }));

app.get("/supported", (_req, res) => {
  res.json(facilitator.getSupported());
});

app.post("/verify", async (req, res) => {
  const parsed = readRequest(req.body);
  if (!parsed) {
    res.status(400).json({ error: "body must carry paymentPayload and paymentRequirements" });
    return;
  }
  try {
    res.json(await facilitator.verify(parsed.paymentPayload, parsed.paymentRequirements));
  } catch (err) {
    res.status(500).json({ error: errorMessage(err) });
  }
});

app.post("/settle", async (req, res) => {
  const parsed = readRequest(req.body);
  if (!parsed) {
    res.status(400).json({ error: "body must carry paymentPayload and paymentRequirements" });
    return;
  }
  try {
    res.json(await facilitator.settle(parsed.paymentPayload, parsed.paymentRequirements));
  } catch (err) {
    res.status(500).json({ error: errorMessage(err) });
  }
});

// Malformed JSON and other body-parser failures: answer JSON, no logging.
app.use((err, _req, res, _next) => {
  res.status(err?.status ?? err?.statusCode ?? 500).json({ error: errorMessage(err) });
});

const server = app.listen(port, "127.0.0.1", (err) => {
  if (err) {
    process.stderr.write(`reference-facilitator: listen failed: ${errorMessage(err)}\n`);
    process.exit(1);
  }
  process.stdout.write(`listening http://127.0.0.1:${server.address().port}\n`);
});

let stopping = false;
function shutdown() {
  if (stopping) return;
  stopping = true;
  server.close(() => process.exit(0));
  server.closeAllConnections();
  // Don't hang on a stuck in-flight request (e.g. a settle waiting on a receipt).
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);
