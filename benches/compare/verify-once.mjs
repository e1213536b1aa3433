// Signs one x402 v2 `exact` EIP-3009 payment with viem and POSTs it to
// `${FACILITATOR_URL}/verify`, in the body shape @x402/core's
// HTTPFacilitatorClient sends. Prints the response JSON; exits 0 iff isValid.
//
// Environment:
//   FACILITATOR_URL  e.g. http://127.0.0.1:PORT (required)
//   PAYER_KEY        0x private key of a funded payer (required)
//   TOKEN            ERC-3009 token address (required)
//   PAY_TO           recipient address (required)
//   TOKEN_NAME       EIP-712 domain name    (default "USD Coin", as `x402d dev` deploys)
//   TOKEN_VERSION    EIP-712 domain version (default "2")
//   AMOUNT           atomic amount (default "100")
//   TAMPER=1         flip one byte of the signature before sending
//   COUNT=N          sign N payments (fresh nonces) up front, POST them one
//                    after another, and report the sequential rate on stderr;
//                    stdout gets the last response. Exit 0 iff all were valid.

import { randomBytes } from "node:crypto";
import { getAddress, toHex } from "viem";
import { privateKeyToAccount } from "viem/accounts";

const CHAIN_ID = 31337;
const NETWORK = `eip155:${CHAIN_ID}`;

function need(name) {
  const value = process.env[name];
  if (!value) {
    process.stderr.write(`verify-once: ${name} is required\n`);
    process.exit(2);
  }
  return value;
}

const facilitatorUrl = need("FACILITATOR_URL").replace(/\/+$/, "");
const payer = privateKeyToAccount(need("PAYER_KEY"));
const token = getAddress(need("TOKEN"));
const payTo = getAddress(need("PAY_TO"));
const name = process.env.TOKEN_NAME || "USD Coin";
const version = process.env.TOKEN_VERSION || "2";
const amount = process.env.AMOUNT || "100";
const tamper = process.env.TAMPER === "1";
const count = Number(process.env.COUNT || 1);

const requirements = {
  scheme: "exact",
  network: NETWORK,
  amount,
  asset: token,
  payTo,
  maxTimeoutSeconds: 60,
  extra: { name, version },
};

async function signPayment() {
  const now = Math.floor(Date.now() / 1000);
  const authorization = {
    from: payer.address,
    to: payTo,
    value: amount,
    validAfter: "0",
    validBefore: String(now + requirements.maxTimeoutSeconds),
    nonce: toHex(randomBytes(32)),
  };
  let signature = await payer.signTypedData({
    domain: { name, version, chainId: CHAIN_ID, verifyingContract: token },
    types: {
      TransferWithAuthorization: [
        { name: "from", type: "address" },
        { name: "to", type: "address" },
        { name: "value", type: "uint256" },
        { name: "validAfter", type: "uint256" },
        { name: "validBefore", type: "uint256" },
        { name: "nonce", type: "bytes32" },
      ],
    },
    primaryType: "TransferWithAuthorization",
    message: {
      ...authorization,
      value: BigInt(authorization.value),
      validAfter: BigInt(authorization.validAfter),
      validBefore: BigInt(authorization.validBefore),
    },
  });
  if (tamper) {
    // Flip the low bit of the first byte of s: still a well-formed 65-byte
    // signature, but it no longer recovers to the payer.
    const i = 2 + 64 * 2;
    const byte = (parseInt(signature.slice(i, i + 2), 16) ^ 1).toString(16).padStart(2, "0");
    signature = signature.slice(0, i) + byte + signature.slice(i + 2);
  }
  const paymentPayload = {
    x402Version: 2,
    accepted: requirements,
    payload: { signature, authorization },
  };
  return JSON.stringify({
    x402Version: paymentPayload.x402Version,
    paymentPayload,
    paymentRequirements: requirements,
  });
}

async function post(body) {
  const res = await fetch(`${facilitatorUrl}/verify`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body,
  });
  const text = await res.text();
  let json;
  try {
    json = JSON.parse(text);
  } catch {
    json = { httpStatus: res.status, body: text };
  }
  return json;
}

const bodies = [];
for (let i = 0; i < count; i++) bodies.push(await signPayment());

let valid = 0;
let last;
const started = process.hrtime.bigint();
for (const body of bodies) {
  last = await post(body);
  if (last && last.isValid === true) valid++;
}
const elapsedMs = Number(process.hrtime.bigint() - started) / 1e6;

process.stdout.write(JSON.stringify(last) + "\n");
if (count > 1) {
  process.stderr.write(
    `${count} sequential /verify in ${elapsedMs.toFixed(1)} ms: ` +
      `${((count * 1000) / elapsedMs).toFixed(1)}/s, ` +
      `${(elapsedMs / count).toFixed(2)} ms each, ${valid} valid\n`,
  );
}
process.exit(valid === count ? 0 : 1);
