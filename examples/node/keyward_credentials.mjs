// A Keyward credential from the gateway, with nothing but the function's own AWS identity.
//
// The function signs an sts:GetCallerIdentity request with the AWS SDK's SigV4 signer (its role's
// credentials, over the gateway's server id) and hands it to the gateway, which asks STS who signed
// it and issues a short-lived credential for that role. No static secret in the function.
//
//   const kw = new KeywardCredential(process.env.KEYWARD_URL, process.env.KEYWARD_SERVER_ID);
//   const token = await kw.token();   // cached, renewed a minute before it expires
//   const child = await kw.child({ allow: ['stripe POST /v1/payment_intents'], ttlS: 300,
//                                  run: `sqs/${messageId}`, lim: { total: 1 } });
import { Sha256 } from '@aws-crypto/sha256-js';
import { defaultProvider } from '@aws-sdk/credential-provider-node';
import { SignatureV4 } from '@smithy/signature-v4';

const STS_BODY = 'Action=GetCallerIdentity&Version=2011-06-15';
const RENEW_BEFORE_S = 60;
const MAX_RUN_LEN = 128;
const MAX_TRACE_LEN = 256;

// This invocation's run label: `apigw/<request id>` for a function behind API Gateway (REST APIs,
// and HTTP APIs with payload 1.0 or 2.0, all carry requestContext.requestId), else
// `lambda/<Lambda's request id>`, else undefined. The access log's `run` then names the API request.
export function runLabel(event, context) {
  const rid = event?.requestContext?.requestId;
  const lid = context?.awsRequestId;
  const label = typeof rid === 'string' && rid ? `apigw/${rid}` : typeof lid === 'string' && lid ? `lambda/${lid}` : undefined;
  if (label === undefined) return undefined;
  // eslint-disable-next-line no-control-regex
  const clean = label.replace(/[\u0000-\u001f\u007f-\u009f]/g, '');
  // The gateway takes at most 128 bytes: cut on a character boundary.
  let out = '';
  for (const ch of clean) {
    if (Buffer.byteLength(out + ch) > MAX_RUN_LEN) break;
    out += ch;
  }
  return out;
}

// The trace header for this invocation's vendor calls: Lambda's own (_X_AMZN_TRACE_ID, set when
// tracing is on), else the one API Gateway passed in the event, else none. Keyward logs it as trace_id.
export function traceHeaders(event) {
  let trace = process.env._X_AMZN_TRACE_ID;
  if (!trace && event?.headers && typeof event.headers === 'object') {
    trace = Object.entries(event.headers).find(([k]) => k.toLowerCase() === 'x-amzn-trace-id')?.[1];
  }
  // An X-Ray trace header is short ASCII (Root=1-…;Parent=…;Sampled=…): anything else is left out.
  return typeof trace === 'string' && trace.length > 0 && trace.length <= MAX_TRACE_LEN && /^[\x20-\x7e]+$/.test(trace) ? { 'X-Amzn-Trace-Id': trace } : {};
}

// A signed GetCallerIdentity request, not sent: the gateway forwards it to STS unchanged.
export async function iamProof(serverId, { credentials = defaultProvider(), region = 'us-east-1', stsHost = 'sts.amazonaws.com' } = {}) {
  const signer = new SignatureV4({ service: 'sts', region, credentials, sha256: Sha256 });
  const signed = await signer.sign({
    method: 'POST', protocol: 'https:', hostname: stsHost, path: '/',
    headers: { host: stsHost, 'content-type': 'application/x-www-form-urlencoded; charset=utf-8', 'x-keyward-server-id': serverId },
    body: STS_BODY,
  });
  return { method: 'POST', url: `https://${stsHost}/`, headers: signed.headers, body: STS_BODY };
}

export class KeywardError extends Error {
  constructor(status, body) {
    super(`HTTP ${status}: ${body.error}: ${body.message}`);
    this.status = status;
    this.code = body.error;
  }
}

export async function post(url, grant, token) {
  const headers = { 'content-type': 'application/json' };
  if (token) headers.authorization = `Bearer ${token}`;
  const r = await fetch(url, { method: 'POST', headers, body: JSON.stringify(grant), signal: AbortSignal.timeout(10_000) });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new KeywardError(r.status, body);
  return body;
}

export class KeywardCredential {
  constructor(gateway, serverId, { allow, ttlS, run, credentials, region, stsHost, path = '/keyward/v1/credentials' } = {}) {
    this.url = gateway.replace(/\/+$/, '') + path;
    Object.assign(this, { serverId, allow, ttlS, run, proofOptions: { credentials, region, stsHost } });
    this.issued = null;
    this.pending = null;
  }

  // The current credential, obtained or renewed when less than a minute is left.
  async token() {
    if (this.issued && Date.now() / 1000 < this.issued.expires_at - RENEW_BEFORE_S) return this.issued.token;
    this.pending ??= (async () => {
      const proofOptions = Object.fromEntries(Object.entries(this.proofOptions).filter(([, v]) => v !== undefined));
      const grant = { grant: 'aws_iam', iam_request: await iamProof(this.serverId, proofOptions) };
      if (this.allow) grant.allow = this.allow;
      if (this.ttlS) grant.ttl_s = this.ttlS;
      if (this.run) grant.run = this.run;
      this.issued = await post(this.url, grant);
    })().finally(() => { this.pending = null; });
    await this.pending;
    return this.issued.token;
  }

  // A credential derived from this one, within it in every dimension; revoking this one revokes it.
  async child({ allow, ttlS, run, lim } = {}) {
    const grant = { grant: 'attenuate' };
    if (allow) grant.allow = allow;
    if (ttlS) grant.ttl_s = ttlS;
    if (run) grant.run = run;
    if (lim) grant.lim = lim;
    return post(this.url, grant, await this.token());
  }
}
