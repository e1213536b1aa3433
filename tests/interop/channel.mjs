// End-to-end `batch-settlement` with the reference x402 packages and x402d
// as the facilitator: an `@x402/express` server with the reference
// batch-settlement server scheme (it keeps the channels' charged totals),
// and an `@x402/fetch` client with the reference batch-settlement client
// (its first request deposits through x402d, later ones send vouchers).
// Then the server's channel manager claims and settles through x402d, and
// the client asks for a cooperative refund of the rest.
//
// Environment as `common.mjs` describes, plus RPC_URL (the anvil node, for the
// client's channel reads). Prints one JSON line per step.
import {
  BatchSettlementEvmScheme as ChannelServer,
  BatchSettlementChannelManager,
} from "@x402/evm/batch-settlement/server";
import { BatchSettlementEvmScheme as ChannelClient } from "@x402/evm/batch-settlement/client";
import { wrapFetchWithPaymentFromConfig, decodePaymentResponseHeader } from "@x402/fetch";
import { NETWORK, account, env, expect, facilitator, payTo, reporter, serveWeather, token } from "./common.mjs";

const report = reporter("step");
const REQUESTS = 3;
const channelServer = new ChannelServer(payTo, { withdrawDelay: 900 });
const { server, url } = await serveWeather("batch-settlement", channelServer, "The weather, paid per request from a channel");

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
