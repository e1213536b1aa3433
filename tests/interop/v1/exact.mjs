// x402 v1 end to end with the v1 reference packages: an `x402-express` 1.x
// resource server whose facilitator is x402d, and an `x402-fetch` 1.x client
// paying with a viem wallet: the `X-PAYMENT` header, `x402Version: 1`,
// `maxAmountRequired` and the network name `base-sepolia` throughout.
//
// These packages live apart from the v2 ones (their own package.json, in
// this directory; `scripts/setup` installs them). Run by the Rust test
// `it::interop` on an anvil whose chain id is Base Sepolia's (84532), with
// the environment `../common.mjs` describes. Prints one JSON line per
// scenario; exits non-zero on the first unexpected outcome.
import express from "express";
import { paymentMiddleware } from "x402-express";
import { decodeXPaymentResponse, wrapFetchWithPayment } from "x402-fetch";
import { createWalletClient, http } from "viem";
import { privateKeyToAccount } from "viem/accounts";
import { baseSepolia } from "viem/chains";
import { env, expect, replayed, reporter } from "../common.mjs";

const report = reporter("scenario");
const [payTo, token] = [env("PAY_TO"), env("TOKEN")];
const PRICE = "1000";

// The v1 server, its price in the project's token (not a default asset).
const app = express();
app.use(
  paymentMiddleware(
    payTo,
    {
      "GET /weather": {
        price: { amount: PRICE, asset: { address: token, decimals: 6, eip712: { name: "USD Coin", version: "2" } } },
        network: "base-sepolia",
        config: { description: "The weather, paid per request", maxTimeoutSeconds: 120 },
      },
    },
    {
      url: env("FACILITATOR_URL"),
      createAuthHeaders: async () => {
        const headers = { Authorization: `Bearer ${env("MERCHANT_KEY")}` };
        return { verify: headers, settle: headers, supported: headers };
      },
    },
  ),
);
app.get("/weather", (_req, res) => res.json({ weather: "sunny" }));
const server = await new Promise((resolve) => {
  const s = app.listen(0, "127.0.0.1", () => resolve(s));
});
const url = `http://127.0.0.1:${server.address().port}/weather`;

const wallet = createWalletClient({
  account: privateKeyToAccount(env("PAYER_KEY")),
  chain: baseSepolia,
  transport: http(env("RPC_URL")),
});

try {
  // 1. Unpaid: 402 with the v1 requirements.
  const unpaid = await fetch(url);
  expect(unpaid.status === 402, `unpaid request answered ${unpaid.status}`);
  const required = await unpaid.json();
  report("unpaid", {
    status: unpaid.status,
    x402Version: required.x402Version,
    network: required.accepts[0].network,
    maxAmountRequired: required.accepts[0].maxAmountRequired,
  });

  // 2. Paid through the v1 client: 200 and an X-PAYMENT-RESPONSE.
  let header;
  const capture = async (input, init) => {
    if (init?.headers?.["X-PAYMENT"]) header = init.headers["X-PAYMENT"];
    return fetch(input, init);
  };
  const paid = await wrapFetchWithPayment(capture, wallet, BigInt(PRICE))(url);
  expect(paid.status === 200, `paid request answered ${paid.status}: ${await paid.clone().text()}`);
  expect((await paid.json()).weather === "sunny", "the paid response is served");
  const settled = decodeXPaymentResponse(paid.headers.get("X-PAYMENT-RESPONSE"));
  expect(header, "the client sent X-PAYMENT");
  report("paid", { status: paid.status, ...settled });

  // 3. The same X-PAYMENT again, ten times one after another and ten times
  // at once: each a 402, never the resource.
  report("replayed", await replayed(url, { "X-PAYMENT": header }));

  // 4. A fresh payment whose X-PAYMENT is sent ten times at once before any
  // of them is recorded: exactly one is served.
  const racing = [];
  const race = async (input, init) => {
    const fresh = init?.headers?.["X-PAYMENT"];
    if (!fresh) return fetch(input, init);
    const copies = await Promise.all(Array.from({ length: 10 }, () => fetch(url, { headers: { "X-PAYMENT": fresh } })));
    for (const c of copies) racing.push({ status: c.status, served: (await c.clone().text()).includes("sunny") });
    return copies.find((c) => c.status === 200) ?? copies[0];
  };
  await wrapFetchWithPayment(race, wallet, BigInt(PRICE))(url);
  report("raced", { copies: racing });

  // 5. Tampered: the amount raised after signing, under a fresh nonce.
  const payment = JSON.parse(Buffer.from(header, "base64").toString());
  payment.payload.authorization.value = "1000000";
  payment.payload.authorization.nonce = `0x${"cd".repeat(32)}`;
  const tampered = await fetch(url, {
    headers: { "X-PAYMENT": Buffer.from(JSON.stringify(payment)).toString("base64") },
  });
  const refusal = await tampered.json();
  report("tampered", { status: tampered.status, error: refusal.error ?? null });
} finally {
  server.close();
}
