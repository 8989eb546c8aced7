// Pays the gateway with the official npm client (@x402/fetch + @x402/evm + viem), set up the way
// its README shows: a viem account, registerExactEvmScheme with the library's defaults (v2 for
// every eip155 network, v1 for its own list of network names, default spend controls).
//
// usage: X402_PAYER_KEY=0x... node pay.mjs GATEWAY_URL [v2|v1] [BODY_JSON]
//
// Mode v1 hides the PAYMENT-REQUIRED header from the client (as an old proxy that drops unknown
// headers would), so the library falls back to the gateway's v1 JSON body and pays with X-PAYMENT.
// The client library itself is untouched in both modes.
//
// Prints one JSON line: {status, body, paymentResponseHeader, settlementHeaders, paymentResponse,
// requests}; settlementHeaders names the settlement headers present on the final answer; requests lists each HTTP exchange as {method, path, paymentHeader, status} (header NAMES only:
// the payment header values are never printed). On a client error: {error} and exit code 2.

import { decodePaymentResponseHeader, wrapFetchWithPayment, x402Client } from "@x402/fetch";
import { registerExactEvmScheme } from "@x402/evm/exact/client";
import { privateKeyToAccount } from "viem/accounts";

const [gatewayUrl, mode = "v2", bodyJson] = process.argv.slice(2);
const key = process.env.X402_PAYER_KEY;
if (!gatewayUrl || !key || (mode !== "v2" && mode !== "v1")) {
  console.error("usage: X402_PAYER_KEY=0x... node pay.mjs GATEWAY_URL [v2|v1] [BODY_JSON]");
  process.exit(64);
}
const body = bodyJson ?? JSON.stringify({ prompt: "a lighthouse at dawn", templateData: { duration: 4 } });

const requests = [];

// The transport handed to the library: plain fetch that records what went over the wire.
async function transport(input, init) {
  const request = new Request(input, init);
  const paymentHeader = ["PAYMENT-SIGNATURE", "X-PAYMENT"].find((name) => request.headers.has(name)) ?? null;
  let response = await fetch(request);
  requests.push({
    method: request.method,
    path: new URL(request.url).pathname,
    paymentHeader,
    status: response.status,
  });
  if (mode === "v1" && response.status === 402) {
    const headers = new Headers(response.headers);
    headers.delete("PAYMENT-REQUIRED");
    response = new Response(response.body, { status: response.status, statusText: response.statusText, headers });
  }
  return response;
}

const account = privateKeyToAccount(key);
const client = registerExactEvmScheme(new x402Client(), { signer: account });
const fetchWithPayment = wrapFetchWithPayment(transport, client);

try {
  const response = await fetchWithPayment(new URL("/generation/create", gatewayUrl), {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body,
  });
  const text = await response.text();
  let parsed;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = text;
  }
  const settlementHeaders = ["PAYMENT-RESPONSE", "X-PAYMENT-RESPONSE"].filter((name) => response.headers.has(name));
  const paymentResponseHeader = settlementHeaders.length ? response.headers.get(settlementHeaders[0]) : null;
  const paymentResponse = paymentResponseHeader ? decodePaymentResponseHeader(paymentResponseHeader) : null;
  console.log(
    JSON.stringify({
      status: response.status,
      body: parsed,
      paymentResponseHeader,
      settlementHeaders,
      paymentResponse,
      requests,
    }),
  );
} catch (error) {
  const message = error instanceof Error ? error.message : String(error);
  console.log(JSON.stringify({ error: message, requests }));
  process.exit(2);
}
