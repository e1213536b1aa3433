// End-to-end interoperability of x402d's facilitator API with the reference
// x402 packages: an `@x402/express` resource server whose facilitator is
// x402d, and an `@x402/fetch` client paying with an `@x402/evm` exact signer.
//
// Run by the Rust test `it::interop` (which starts anvil and x402d) with
// the environment `common.mjs` describes. Prints one JSON line per scenario on stdout; exits non-zero on the first
// unexpected outcome.
import { ExactEvmScheme as ExactEvmServer } from "@x402/evm/exact/server";
import { ExactEvmScheme as ExactEvmClient } from "@x402/evm/exact/client";
import { wrapFetchWithPaymentFromConfig, decodePaymentResponseHeader } from "@x402/fetch";
import { NETWORK, PRICE, account, expect, replayed, reporter, serveWeather, token } from "./common.mjs";

const report = reporter("scenario");
const { server, url } = await serveWeather("exact", new ExactEvmServer(), "The weather, paid per request");

try {
  // 1. Unpaid: 402 with the requirements.
  const unpaid = await fetch(url);
  expect(unpaid.status === 402, `unpaid request answered ${unpaid.status}`);
  const required = JSON.parse(Buffer.from(unpaid.headers.get("PAYMENT-REQUIRED"), "base64").toString());
  expect(required.accepts[0].asset.toLowerCase() === token.toLowerCase(), "402 names the token");
  report("unpaid", { status: unpaid.status });

  // 2. Paid through the reference client: 200 and a PAYMENT-RESPONSE.
  let signature;
  const capture = async (input, init) => {
    const headers = new Headers(init?.headers ?? (input instanceof Request ? input.headers : undefined));
    if (headers.get("PAYMENT-SIGNATURE")) signature = headers.get("PAYMENT-SIGNATURE");
    return fetch(input, init);
  };
  const pay = wrapFetchWithPaymentFromConfig(capture, {
    schemes: [{ network: NETWORK, client: new ExactEvmClient(account) }],
    // The project's token is not one of the client's default assets.
    spendControls: { allowedAssets: [{ network: NETWORK, asset: token, maxAmountPerPayment: PRICE }] },
  });
  const paid = await pay(url);
  expect(paid.status === 200, `paid request answered ${paid.status}: ${await paid.clone().text()}`);
  const body = await paid.json();
  expect(body.weather === "sunny", "the paid response is served");
  const settled = decodePaymentResponseHeader(paid.headers.get("PAYMENT-RESPONSE"));
  expect(settled.success === true, `settlement failed: ${JSON.stringify(settled)}`);
  expect(signature, "the client sent PAYMENT-SIGNATURE");
  report("paid", { status: paid.status, transaction: settled.transaction, payer: settled.payer, network: settled.network });

  // 3. The same PAYMENT-SIGNATURE again, ten times one after another and ten
  // times at once: each a 402, never the resource (x402d refuses a payment
  // it has recorded, as the reference refuses a spent nonce).
  report("replayed", await replayed(url, { "PAYMENT-SIGNATURE": signature }));

  // 3b. A fresh payment whose PAYMENT-SIGNATURE is sent ten times at once
  // before any of them is recorded: exactly one is served.
  const racing = [];
  const race = async (input, init) => {
    const headers = new Headers(init?.headers ?? (input instanceof Request ? input.headers : undefined));
    const header = headers.get("PAYMENT-SIGNATURE");
    if (!header) return fetch(input, init);
    const copies = await Promise.all(
      Array.from({ length: 10 }, () => fetch(url, { headers: { "PAYMENT-SIGNATURE": header } })),
    );
    for (const c of copies) racing.push({ status: c.status, served: (await c.clone().text()).includes("sunny") });
    return copies.find((c) => c.status === 200) ?? copies[0];
  };
  const payRacing = wrapFetchWithPaymentFromConfig(race, {
    schemes: [{ network: NETWORK, client: new ExactEvmClient(account) }],
    spendControls: { allowedAssets: [{ network: NETWORK, asset: token, maxAmountPerPayment: PRICE }] },
  });
  await payRacing(url);
  report("raced", { copies: racing });

  // 4. Tampered: the amount raised after signing. The server refuses it.
  const payload = JSON.parse(Buffer.from(signature, "base64").toString());
  payload.payload.authorization.value = "1000000";
  payload.payload.authorization.nonce = `0x${"ab".repeat(32)}`;
  const tampered = await fetch(url, {
    headers: { "PAYMENT-SIGNATURE": Buffer.from(JSON.stringify(payload)).toString("base64") },
  });
  expect(tampered.status === 402, `tampered payment answered ${tampered.status}`);
  const refusal = JSON.parse(Buffer.from(tampered.headers.get("PAYMENT-REQUIRED"), "base64").toString());
  report("tampered", { status: tampered.status, error: refusal.error ?? null });
} finally {
  server.close();
}
