// A Lambda handler that calls Stripe and Anthropic through Keyward, with the vendors' own SDKs.
//
// The function holds a Keyward credential (KEYWARD_TOKEN, minted at deploy time; see
// examples/README.md), never a vendor key. Each SDK gets the credential where it expects its API key
// and sends its requests to the Keyward gateway (KEYWARD_URL), which swaps in the real key.
import Anthropic from '@anthropic-ai/sdk';
import Stripe from 'stripe';
import { randomUUID } from 'node:crypto';

const gateway = () => (process.env.KEYWARD_URL ?? '').replace(/\/+$/, '');

// stripe-node takes a host but no base path, so its requests go through a fetch that moves
// https://api.stripe.com/v1/... to <gateway>/stripe/v1/... (and nowhere else).
function stripeFetch(url, init) {
  const u = new URL(url);
  if (u.hostname !== 'api.stripe.com') throw new Error(`unexpected Stripe host ${u.hostname}`);
  return fetch(`${gateway()}/stripe${u.pathname}${u.search}`, init);
}

export function clients(token = process.env.KEYWARD_TOKEN) {
  const pay = new Stripe(token, {
    httpClient: Stripe.createFetchHttpClient(stripeFetch),
    maxNetworkRetries: 0,
    telemetry: false,
  });
  const llm = new Anthropic({ apiKey: token, baseURL: `${gateway()}/anthropic`, maxRetries: 0 });
  return { pay, llm };
}

export async function handler(event = {}) {
  const { pay, llm } = clients();
  const order = event.order_id ?? randomUUID();
  // POSTs to Stripe carry an Idempotency-Key (the gateway's stripe target requires one).
  const intent = await pay.paymentIntents.create(
    { amount: Number(event.amount ?? 1000), currency: 'usd' },
    { idempotencyKey: `order-${order}` },
  );
  const message = await llm.messages.create({
    model: event.model ?? 'claude-sonnet-5',
    max_tokens: 64,
    messages: [{ role: 'user', content: `Write a one-line receipt for order ${order}.` }],
  });
  return { order, payment_intent: intent, message };
}

// `node handler.mjs` runs it once, as Lambda would, with EVENT as the event.
if (import.meta.url === `file://${process.argv[1]}`) {
  handler(JSON.parse(process.env.EVENT ?? '{}'))
    .then((r) => console.log(JSON.stringify(r, null, 2)))
    .catch((e) => { console.error(e?.message ?? e); process.exit(1); });
}
