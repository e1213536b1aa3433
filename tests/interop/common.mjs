// What the interoperability scripts share: their environment, reporting,
// and the resource server (one paid route, priced in the project's token,
// with x402d as its facilitator).
//
//   FACILITATOR_URL  x402d's HTTP listener, e.g. http://127.0.0.1:8402
//   MERCHANT_KEY     the merchant's API key (Bearer auth on /verify, /settle, /supported)
//   PAY_TO, TOKEN    the merchant's address and the EIP-3009 token
//   PAYER_KEY        the payer's private key (0x-hex)
//   NETWORK          the CAIP-2 network paid on (default eip155:31337)
import express from "express";
import { paymentMiddleware, x402ResourceServer } from "@x402/express";
import { HTTPFacilitatorClient } from "@x402/core/server";
import { privateKeyToAccount } from "viem/accounts";

// The network paid on (a node settling several chains is paid on each).
export const NETWORK = process.env.NETWORK ?? "eip155:31337";
export const PRICE = "1000";

export function env(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

export const payTo = env("PAY_TO");
export const token = env("TOKEN");
export const account = privateKeyToAccount(env("PAYER_KEY"));

/// x402d as the reference server's facilitator, with the merchant's key.
export const facilitator = new HTTPFacilitatorClient({
  url: env("FACILITATOR_URL"),
  createAuthHeaders: async () => {
    const headers = { Authorization: `Bearer ${env("MERCHANT_KEY")}` };
    return { verify: headers, settle: headers, supported: headers };
  },
});

/// Prints one JSON line `{<key>: name, ...fields}` on stdout.
export function reporter(key) {
  return (name, fields) => console.log(JSON.stringify({ [key]: name, ...fields }));
}

/// Sends `headers` (a paid request's payment header) to `url` ten times one
/// after another and ten times at once; what each answer was and whether it
/// served the resource.
export async function replayed(url, headers) {
  const replay = async () => {
    const r = await fetch(url, { headers });
    return { status: r.status, served: (await r.text()).includes("sunny") };
  };
  const sequential = [];
  for (let i = 0; i < 10; i++) sequential.push(await replay());
  const concurrent = await Promise.all(Array.from({ length: 10 }, replay));
  return { sequential, concurrent };
}

export function expect(condition, message) {
  if (!condition) {
    console.error(`interop: ${message}`);
    process.exit(1);
  }
}

/// Starts an `@x402/express` server with `GET /weather` paid by `scheme`
/// (served by `serverScheme`); returns the server and the route's URL.
export async function serveWeather(scheme, serverScheme, description) {
  const resourceServer = new x402ResourceServer(facilitator).register(NETWORK, serverScheme);
  const app = express();
  app.use(
    paymentMiddleware(
      {
        "GET /weather": {
          accepts: {
            scheme,
            network: NETWORK,
            payTo,
            price: { asset: token, amount: PRICE, extra: { name: "USD Coin", version: "2" } },
            maxTimeoutSeconds: 120,
          },
          description,
        },
      },
      resourceServer,
    ),
  );
  app.get("/weather", (_req, res) => res.json({ weather: "sunny" }));
  const server = await new Promise((resolve) => {
    const s = app.listen(0, "127.0.0.1", () => resolve(s));
  });
  return { server, url: `http://127.0.0.1:${server.address().port}/weather` };
}
