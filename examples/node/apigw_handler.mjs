// A Lambda function behind API Gateway (REST or HTTP API) that calls Stripe and Anthropic through
// Keyward with the vendors' own SDKs, one narrower credential per invocation.
//
// Each invocation derives a child of the function's credential (KEYWARD_TOKEN), good for five
// minutes and for what this request needs, labelled with the API Gateway request id (`run`), and
// sends the trace id on every vendor call: Keyward's access log (`run`, `trace_id`) then joins API
// Gateway's access log and X-Ray. No vendor key anywhere in the function.
import Anthropic from '@anthropic-ai/sdk';
import Stripe from 'stripe';
import { randomUUID } from 'node:crypto';
import { post, runLabel, traceHeaders } from './keyward_credentials.mjs';

const ALLOW = ['stripe POST /v1/payment_intents', 'anthropic POST /v1/messages'];
const gateway = () => (process.env.KEYWARD_URL ?? '').replace(/\/+$/, '');

// A credential for this invocation only: derived from the function's, within it.
export async function childCredential(event, context) {
  const grant = { grant: 'attenuate', allow: ALLOW, ttl_s: 300 };
  const run = runLabel(event, context);
  if (run) grant.run = run;
  return (await post(`${gateway()}/keyward/v1/credentials`, grant, process.env.KEYWARD_TOKEN)).token;
}

export async function handler(event = {}, context = {}) {
  const token = await childCredential(event, context);
  const headers = traceHeaders(event);
  // stripe-node takes a host but no base path: its requests go to <gateway>/stripe/..., with the trace header.
  const stripeFetch = (url, init) => {
    const u = new URL(url);
    if (u.hostname !== 'api.stripe.com') throw new Error(`unexpected Stripe host ${u.hostname}`);
    const h = new Headers(init?.headers);
    for (const [k, v] of Object.entries(headers)) h.set(k, v);
    return fetch(`${gateway()}/stripe${u.pathname}${u.search}`, { ...init, headers: h });
  };
  const pay = new Stripe(token, { httpClient: Stripe.createFetchHttpClient(stripeFetch), maxNetworkRetries: 0, telemetry: false });
  const llm = new Anthropic({ apiKey: token, baseURL: `${gateway()}/anthropic`, maxRetries: 0, defaultHeaders: headers });
  const body = typeof event.body === 'string' ? JSON.parse(event.body || '{}') : {};
  const order = body.order_id ?? randomUUID();
  const intent = await pay.paymentIntents.create({ amount: Number(body.amount ?? 1000), currency: 'usd' }, { idempotencyKey: `order-${order}` });
  const message = await llm.messages.create({
    model: body.model ?? 'claude-sonnet-5',
    max_tokens: 64,
    messages: [{ role: 'user', content: `Write a one-line receipt for order ${order}.` }],
  });
  return { statusCode: 200, headers: { 'content-type': 'application/json' }, body: JSON.stringify({ order, payment_intent: intent, message }) };
}

// `node apigw_handler.mjs` runs it once, as Lambda would, with EVENT and CONTEXT (JSON).
if (import.meta.url === `file://${process.argv[1]}`) {
  handler(JSON.parse(process.env.EVENT ?? '{}'), JSON.parse(process.env.CONTEXT ?? '{}'))
    .then((r) => console.log(JSON.stringify(r)))
    .catch((e) => { console.error(e?.message ?? e); process.exit(1); });
}
