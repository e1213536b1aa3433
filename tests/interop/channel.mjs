// End-to-end `batch-settlement` with the reference x402 packages and x402d
// as the facilitator: an `@x402/express` server with the reference
// batch-settlement server scheme (it keeps the channels' charged totals),
// and an `@x402/fetch` client with the reference batch-settlement client
// (its first request deposits through x402d, later ones send vouchers).
// Then the server's channel manager claims and settles through x402d, and
// the client asks for a cooperative refund of the rest.
//
// Environment as for exact.mjs, plus RPC_URL (the anvil node, for the
// client's channel reads). Prints one JSON line per step.
import express from "express";
import { paymentMiddleware, x402ResourceServer } from "@x402/express";
import { HTTPFacilitatorClient } from "@x402/core/server";
import {
  BatchSettlementEvmScheme as ChannelServer,
  BatchSettlementChannelManager,
} from "@x402/evm/batch-settlement/server";
import { BatchSettlementEvmScheme as ChannelClient } from "@x402/evm/batch-settlement/client";
import { wrapFetchWithPaymentFromConfig, decodePaymentResponseHeader } from "@x402/fetch";
import { privateKeyToAccount } from "viem/accounts";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const NETWORK = "eip155:31337";
const PRICE = "1000";
const REQUESTS = 3;
const facilitatorUrl = env("FACILITATOR_URL");
const merchantKey = env("MERCHANT_KEY");
const payTo = env("PAY_TO");
const token = env("TOKEN");
const account = privateKeyToAccount(env("PAYER_KEY"));

function report(step, fields) {
  console.log(JSON.stringify({ step, ...fields }));
}

function expect(condition, message) {
  if (!condition) {
    console.error(`interop: ${message}`);
    process.exit(1);
  }
}

const facilitator = new HTTPFacilitatorClient({
  url: facilitatorUrl,
  createAuthHeaders: async () => {
    const headers = { Authorization: `Bearer ${merchantKey}` };
    return { verify: headers, settle: headers, supported: headers };
  },
});
const channelServer = new ChannelServer(payTo, { withdrawDelay: 900 });
const resourceServer = new x402ResourceServer(facilitator).register(NETWORK, channelServer);
const app = express();
app.use(
  paymentMiddleware(
    {
      "GET /weather": {
        accepts: {
          scheme: "batch-settlement",
          network: NETWORK,
          payTo,
          price: { asset: token, amount: PRICE, extra: { name: "USD Coin", version: "2" } },
          maxTimeoutSeconds: 120,
        },
        description: "The weather, paid per request from a channel",
      },
    },
    resourceServer,
  ),
);
app.get("/weather", (_req, res) => res.json({ weather: "sunny" }));
const server = await new Promise((resolve) => {
  const s = app.listen(0, "127.0.0.1", () => resolve(s));
});
const url = `http://127.0.0.1:${server.address().port}/weather`;

try {
  const channelClient = new ChannelClient(account, { rpcUrl: env("RPC_URL") });
  const pay = wrapFetchWithPaymentFromConfig(fetch, {
    schemes: [{ network: NETWORK, client: channelClient }],
    spendControls: { allowedAssets: [{ network: NETWORK, asset: token }] },
  });
  for (let i = 0; i < REQUESTS; i++) {
    const paid = await pay(url);
    const text = await paid.text();
    expect(paid.status === 200, `request ${i} answered ${paid.status}: ${text}`);
    const header = paid.headers.get("PAYMENT-RESPONSE");
    const settled = header ? decodePaymentResponseHeader(header) : null;
    report("paid", { request: i, status: paid.status, transaction: settled?.transaction ?? "", success: settled?.success ?? null });
  }

  // The server claims what it charged and settles, through x402d.
  const manager = new BatchSettlementChannelManager({
    scheme: channelServer,
    facilitator,
    receiver: payTo,
    token,
    network: NETWORK,
  });
  const result = await manager.claimAndSettle();
  report("claimed", { result: JSON.parse(JSON.stringify(result, (_k, v) => (typeof v === "bigint" ? v.toString() : v))) });

  // The payer takes back what it did not spend: a cooperative refund,
  // through the server, executed by x402d.
  const refunded = await channelClient.refund(url);
  expect(refunded.success === true, `refund failed: ${JSON.stringify(refunded)}`);
  report("refunded", { transaction: refunded.transaction, amount: refunded.amount ?? null });
} finally {
  server.close();
}
