// x402 v1 against x402d's facilitator API, with the reference packages'
// v1 parts: `@x402/evm`'s `ExactEvmSchemeV1` signs the payment (the v1
// client's scheme), and `@x402/core`'s `HTTPFacilitatorClient` sends the v1
// `/verify` and `/settle` bodies a v1 resource server sends (`x402Version:
// 1`, `maxAmountRequired`, the network `base-sepolia`).
//
// Run by the Rust test `it::interop` on an anvil whose chain id is Base
// Sepolia's (84532), with the environment `common.mjs` describes. Prints one
// JSON line per scenario; exits non-zero on the first unexpected outcome.
import { ExactEvmSchemeV1 } from "@x402/evm/v1";
import { account, expect, facilitator, payTo, reporter, token } from "./common.mjs";

const report = reporter("scenario");
const requirements = {
  scheme: "exact",
  network: "base-sepolia",
  maxAmountRequired: "1000",
  resource: "http://127.0.0.1/weather",
  description: "The weather, paid per request",
  mimeType: "application/json",
  payTo,
  maxTimeoutSeconds: 120,
  asset: token,
  outputSchema: {},
  extra: { name: "USD Coin", version: "2" },
};
const scheme = new ExactEvmSchemeV1(account);
const pay = () => scheme.createPaymentPayload(1, requirements);

const supported = await facilitator.getSupported();
report("supported", { kinds: supported.kinds });

const payment = await pay();
expect(payment.x402Version === 1 && payment.network === "base-sepolia", `not a v1 payload: ${JSON.stringify(payment)}`);
report("verified", await facilitator.verify(payment, requirements));
report("settled", await facilitator.settle(payment, requirements));
// The same payment again: refused, never settled twice.
report("replayed", await facilitator.settle(payment, requirements));
// Tampered after signing: refused.
const tampered = structuredClone(payment);
tampered.payload.authorization.value = "1";
report("tampered", await facilitator.verify(tampered, { ...requirements, maxAmountRequired: "1" }));
// Another payment, as the X-PAYMENT header a v1 client sends, for the
// test to submit through gRPC's raw-header field.
report("header", { header: Buffer.from(JSON.stringify(await pay())).toString("base64") });
