//! The issuing endpoint (`{"endpoint": "issue"}`) across its events: the request body arrives,
//! an `aws_iam` proof goes to STS from the root (like every callout), an `attenuate` grant's parent
//! credential is verified (it may wait for a store-held key or the revocation list, like any
//! request), the issuing key is found (it may wait for its store too), and the stream is answered
//! with the credential or a contract error. Nothing is ever forwarded upstream.

use super::admission_view::SharedSecrets;
use super::request::{write_audit, HostRequest};
use super::state::{IssueStep, Issuing, Purpose, Stream};
use super::{Answer, Lifecycle, CALL_GRACE_MS};
use crate::config::{Config, KeySource};
use crate::credential::jwt;
use crate::engine::{self, Lookup, Outcome, Request, Secrets};
use crate::host::{Action, CallId, ContextId, Host};
use crate::issue::grant::{self, Grant, Scope};
use crate::issue::sts::{self, ProofError};
use crate::record::{Audit, Family, Metric};
use crate::response::{Code, Denial};
use std::rc::Rc;

/// How long an issuance may wait (for STS, a key, the revocation list) before it gets 503.
const ISSUE_WAIT_MS: u64 = 3000;

/// The public answer to a refused proof (fixed messages: nothing the caller sent is echoed; the
/// detail goes to the log, bounded).
fn refusal(e: &ProofError) -> Denial {
    log::info!("identity proof not accepted: {}", detail(&format!("{e:?}")));
    match e {
        ProofError::Malformed(_) => Denial::new(Code::BadRequest, "the identity proof is not a signed sts:GetCallerIdentity request for this gateway"),
        ProofError::Refused(_) => Denial::new(Code::InvalidCredential, "the identity proof was refused"),
        ProofError::Unavailable(_) => Denial::new(Code::SecretUnavailable, "STS could not confirm the identity; try again").retry_after(5),
    }
}

/// A log-safe, bounded rendering of a refusal's detail.
fn detail(m: &str) -> String {
    m.chars().filter(|c| !c.is_control()).take(200).collect()
}

impl Lifecycle {
    /// The endpoint's request headers: check them and wait for the body. The headers go on
    /// (`Continue`): Envoy delivers a body to a wasm filter only after its headers continued
    /// (a paused stream's body is held by Envoy, out of the filter's reach). The issuing route
    /// therefore has Envoy's buffer filter after Keyward, which holds the headers back from the
    /// router until the whole body has passed, and Keyward answers before it ever has; its
    /// `direct_response` is the answer when the filter does not run (`keyward check-envoy`
    /// requires both).
    pub(super) fn issue_start(&mut self, host: &mut impl Host, ctx: ContextId, now_ms: u64) -> Action {
        let started_us = self.now_us;
        let Some(cfg) = self.cfg.clone() else {
            return self.issue_refuse_now(host, Audit::default(), &Denial::new(Code::SecretUnavailable, "the gateway is not configured").retry_after(5));
        };
        if cfg.issuer.is_none() {
            return self.issue_refuse_now(host, Audit::default(), &Denial::new(Code::UnknownTarget, "this gateway does not issue credentials"));
        }
        let mut req = HostRequest::read(host);
        if req.method().as_deref() != Some("POST") {
            return self.issue_refuse_now(host, Audit::default(), &Denial::new(Code::BadRequest, "the issuing endpoint takes POST"));
        }
        let json = req.header("content-type").is_some_and(|v| v.to_ascii_lowercase().starts_with(b"application/json"));
        if !json {
            return self.issue_refuse_now(host, Audit::default(), &Denial::new(Code::BadRequest, "the issuing endpoint takes content-type: application/json"));
        }
        let too_long =
            req.header("content-length").and_then(|v| String::from_utf8(v).ok()).and_then(|v| v.parse::<usize>().ok()).is_some_and(|n| n > grant::MAX_BODY);
        if too_long {
            return self.issue_refuse_now(host, Audit::default(), &Denial::new(Code::BadRequest, "the request body is larger than 16 KiB"));
        }
        let deadline_ms = now_ms + ISSUE_WAIT_MS + cfg.issuer.as_ref().and_then(|i| i.aws_iam.as_ref()).map_or(0, |a| u64::from(a.sts.timeout_ms));
        self.streams.insert(
            ctx,
            Stream::Issuing(Box::new(Issuing {
                step: IssueStep::Body,
                deadline_ms,
                started_us,
                body: crate::secret::Secret::new(Vec::new()),
                grant: None,
                call: None,
                principal: None,
                authorization: req.header("authorization").map(crate::secret::Secret::new),
                audit: Audit::default(),
            })),
        );
        Action::Continue
    }

    /// Part of a request body. Only an issuance reads it; other streams go on.
    pub(super) fn issue_body(&mut self, host: &mut impl Host, ctx: ContextId, size: Option<usize>, end: bool) -> Action {
        if !matches!(self.issuing(ctx).map(|i| &i.step), Some(IssueStep::Body)) {
            // Its body was read already: nothing more of it goes anywhere.
            return Action::Pause;
        }
        if size.is_some_and(|n| n > grant::MAX_BODY) {
            return self.issue_refuse(host, ctx, &Denial::new(Code::BadRequest, "the request body is larger than 16 KiB"));
        }
        if !end {
            return Action::Pause;
        }
        // Ended by trailers: what is buffered, and one byte more than the bound to tell.
        let body = match host.request_body(size.unwrap_or(grant::MAX_BODY + 1)) {
            Ok(b) if b.len() > grant::MAX_BODY => {
                return self.issue_refuse(host, ctx, &Denial::new(Code::BadRequest, "the request body is larger than 16 KiB"))
            }
            Ok(b) => b,
            Err(_) => return self.issue_refuse(host, ctx, &Denial::new(Code::BadRequest, "the request body could not be read")),
        };
        let g = match grant::parse(&body) {
            Ok(g) => g,
            Err(m) => {
                log::info!("issuance refused: {}", detail(&m));
                return self.issue_refuse(host, ctx, &Denial::new(Code::BadRequest, "the request body is not a valid grant"));
            }
        };
        if let Some(i) = self.issuing_mut(ctx) {
            i.body = crate::secret::Secret::new(body);
            i.grant = Some(g);
            i.step = IssueStep::Waiting;
        }
        self.issue_continue(host, ctx)
    }

    /// Take the issuance of `ctx` as far as it can go now (the effective context is `ctx`).
    fn issue_continue(&mut self, host: &mut impl Host, ctx: ContextId) -> Action {
        let (Some(cfg), Some(i)) = (self.cfg.clone(), self.issuing(ctx)) else { return Action::Pause };
        let Some(issuer) = cfg.issuer.as_ref() else { return Action::Pause };
        let now_ms = self.now_us / 1000;
        let now_s = (now_ms / 1000) as i64;
        let scope = match i.grant.clone() {
            Some(Grant::AwsIam { proof, ask }) => {
                let Some(aws) = issuer.aws_iam.as_ref() else {
                    return self.issue_refuse(host, ctx, &Denial::new(Code::BadRequest, "this gateway does not issue for aws_iam"));
                };
                let Some(principal) = i.principal.clone() else {
                    if i.call.is_some() || matches!(i.step, IssueStep::StsInFlight { .. }) {
                        return Action::Pause;
                    }
                    let call = match sts::callout(&proof, &aws.sts) {
                        Ok(c) => c,
                        Err(e) => return self.issue_refuse(host, ctx, &refusal(&e)),
                    };
                    if let Some(i) = self.issuing_mut(ctx) {
                        i.call = Some(call);
                    }
                    if self.in_root {
                        self.pump_issuing(host);
                    } else {
                        self.want_root(host);
                    }
                    return Action::Pause;
                };
                let Some(role) = aws.roles.get(&principal) else {
                    log::info!("issuance refused: {principal} is not mapped to a role");
                    return self.issue_refuse(host, ctx, &Denial::new(Code::Forbidden, "this AWS identity is not mapped to a Keyward role"));
                };
                match grant::for_role(role, &ask, now_s) {
                    Ok(s) => s,
                    Err(e) => return self.over_asked(host, ctx, &e.0),
                }
            }
            Some(Grant::Attenuate { ask, lim }) => {
                if !issuer.attenuate {
                    return self.issue_refuse(host, ctx, &Denial::new(Code::BadRequest, "this gateway does not issue for attenuate"));
                }
                let mut audit = Audit::default();
                let authorization = i.authorization.clone();
                let verified = {
                    let mut secrets = SharedSecrets::new(self, host, now_ms);
                    engine::verify_bearer(&cfg, authorization.as_ref().map(|a| a.expose()), &mut secrets, &mut audit, now_s)
                };
                if let Some(i) = self.issuing_mut(ctx) {
                    i.audit.subject = audit.subject.clone();
                    i.audit.jti = audit.jti.clone();
                }
                let (parent, parent_kid) = match verified {
                    Ok(p) => p,
                    Err(Outcome::Deny(d)) => return self.issue_refuse(host, ctx, &d),
                    Err(Outcome::Need(slot)) => {
                        self.start_fetch(host, slot);
                        return Action::Pause;
                    }
                    Err(Outcome::NeedRevocation) => {
                        self.want_root(host);
                        return Action::Pause;
                    }
                    Err(Outcome::NeedLedger(_)) => return Action::Pause,
                    Err(Outcome::Allow(_)) => return Action::Pause,
                };
                match grant::for_child(&parent, &parent_kid, &ask, lim.as_ref(), issuer.max_ttl_s, now_s) {
                    Ok(s) => s,
                    Err(e) => return self.over_asked(host, ctx, &e.0),
                }
            }
            None => return Action::Pause,
        };
        self.issue_mint(host, ctx, &cfg, &scope, now_ms)
    }

    /// Sign the credential with the issuing key and answer 200.
    fn issue_mint(&mut self, host: &mut impl Host, ctx: ContextId, cfg: &Rc<Config>, scope: &Scope, now_ms: u64) -> Action {
        let Some(issuer) = cfg.issuer.as_ref() else { return Action::Pause };
        let key = match cfg.key(&issuer.kid).map(|k| &k.source) {
            Some(KeySource::Ready(k)) => Rc::new(k.clone()),
            Some(KeySource::Stored { slot, field }) => {
                let (slot, field) = (*slot, field.clone());
                let looked = {
                    let mut secrets = SharedSecrets::new(self, host, now_ms);
                    secrets.signing_key(slot, &field)
                };
                match looked {
                    Lookup::Ready(Some(k)) | Lookup::Stale(Some(k)) => k,
                    Lookup::Pending => {
                        self.start_fetch(host, slot);
                        return Action::Pause;
                    }
                    _ => return self.issue_refuse(host, ctx, &Denial::new(Code::SecretUnavailable, "the issuing key is unavailable").retry_after(5)),
                }
            }
            None => return self.issue_refuse(host, ctx, &Denial::new(Code::SecretUnavailable, "the issuing key is unavailable").retry_after(5)),
        };
        let now_s = (now_ms / 1000) as i64;
        self.issue_seq = self.issue_seq.wrapping_add(1);
        let body = self.issuing(ctx).map(|i| i.body.expose().to_vec()).unwrap_or_default();
        let jti = grant::new_jti(&key, self.now_us, self.root, self.issue_seq, &body);
        let claims = grant::claims_json(scope, &jti, now_s, &cfg.policy.audience, cfg.policy.issuer.as_deref());
        let token = jwt::mint(&issuer.kid, &key, &claims);
        let Some(mut i) = self.take_issuing(ctx) else { return Action::Pause };
        self.streams.insert(ctx, Stream::Answered);
        i.audit.subject = Some(scope.sub.clone());
        i.audit.run.clone_from(&scope.run);
        i.audit.issued = Some(jti.clone());
        i.audit.decision = "issued";
        write_audit(host, &i.audit);
        host.metric(Metric::Issued);
        let added = host.clock_us().saturating_sub(i.started_us);
        host.observe(Family::AddedUs, &["issued"], added);
        log::info!("issued {jti} to {} (until {})", scope.sub, scope.exp);
        let headers = [("content-type", "application/json".to_string()), ("cache-control", "no-store".to_string())];
        if host.reply(200, &headers, &grant::response_json(&token, &jti, scope)).is_err() {
            host.reset();
        }
        if self.current != ctx {
            let _ = self.enter(host, self.root);
        }
        Action::Pause
    }

    fn over_asked(&mut self, host: &mut impl Host, ctx: ContextId, why: &str) -> Action {
        log::info!("issuance refused: {}", detail(why));
        self.issue_refuse(host, ctx, &Denial::new(Code::Forbidden, "the requested scope exceeds what may be granted"))
    }

    /// Refuse a request that has no issuance record yet (the current stream).
    fn issue_refuse_now(&mut self, host: &mut impl Host, mut audit: Audit, d: &Denial) -> Action {
        self.streams.insert(self.current, Stream::Answered);
        audit.decision = d.code.as_str();
        write_audit(host, &audit);
        host.metric(Metric::IssueDenied(d.code));
        if host.reply(d.status(), &d.headers(), &d.body()).is_err() {
            host.reset();
        }
        Action::Pause
    }

    /// Refuse the issuance of `ctx` (the effective context is `ctx`).
    fn issue_refuse(&mut self, host: &mut impl Host, ctx: ContextId, d: &Denial) -> Action {
        let audit = self.take_issuing(ctx).map(|i| i.audit).unwrap_or_default();
        log::info!("issuance refused: {} ({})", d.code.as_str(), d.message);
        self.issue_refuse_now(host, audit, d)
    }

    /// Send the STS callouts queued by streams (root events only).
    pub(super) fn pump_issuing(&mut self, host: &mut impl Host) {
        let queued: Vec<ContextId> = self.issuing_streams().into_iter().filter(|c| self.issuing(*c).is_some_and(|i| i.call.is_some())).collect();
        for ctx in queued {
            let Some(call) = self.issuing_mut(ctx).and_then(|i| i.call.take()) else { continue };
            match self.send(host, &call) {
                Ok(id) => {
                    let deadline_ms = (self.now_us / 1000) + u64::from(call.timeout_ms) + CALL_GRACE_MS;
                    self.calls.insert(id, Purpose::Sts(ctx));
                    if let Some(i) = self.issuing_mut(ctx) {
                        i.step = IssueStep::StsInFlight { call: id, deadline_ms };
                    }
                }
                Err(_) => {
                    if self.enter(host, ctx).is_ok() {
                        self.issue_refuse(host, ctx, &Denial::new(Code::SecretUnavailable, "STS could not be asked").retry_after(5));
                    }
                    self.take_issuing(ctx);
                }
            }
        }
    }

    /// STS answered (or failed) for the issuance of `ctx`.
    pub(super) fn on_sts_answer(&mut self, host: &mut impl Host, ctx: ContextId, call: CallId, answer: Answer) {
        match self.issuing(ctx).map(|i| &i.step) {
            Some(IssueStep::StsInFlight { call: c, .. }) if *c == call => {}
            _ => return,
        }
        if self.enter(host, ctx).is_err() {
            self.take_issuing(ctx);
            return;
        }
        let arn = match sts::parse_answer(answer.status, answer.body.as_deref()) {
            Ok(a) => a,
            Err(e) => {
                log::info!("STS refused or failed an issuance: {e:?}");
                self.issue_refuse(host, ctx, &refusal(&e));
                return;
            }
        };
        let Some(principal) = sts::principal(&arn) else {
            self.issue_refuse(host, ctx, &Denial::new(Code::Forbidden, "this AWS identity is not mapped to a Keyward role"));
            return;
        };
        if let Some(i) = self.issuing_mut(ctx) {
            i.principal = Some(principal);
            i.step = IssueStep::Waiting;
        }
        self.issue_continue(host, ctx);
    }

    /// Root events: issuances waiting for a key or the revocation list try again; those past
    /// their deadline get 503.
    pub(super) fn tick_issuing(&mut self, host: &mut impl Host, now_ms: u64) {
        let ctxs = self.issuing_streams();
        for ctx in ctxs {
            let Some(i) = self.issuing(ctx) else { continue };
            let late = now_ms >= i.deadline_ms;
            let waiting = matches!(i.step, IssueStep::Waiting) && i.call.is_none();
            if !late && !waiting {
                continue;
            }
            if self.enter(host, ctx).is_err() {
                self.take_issuing(ctx);
                continue;
            }
            if late {
                if let Some(IssueStep::StsInFlight { call, .. }) = self.issuing(ctx).map(|i| i.step.clone()) {
                    self.calls.remove(&call);
                }
                self.issue_refuse(host, ctx, &Denial::new(Code::SecretUnavailable, "the issuance did not complete in time").retry_after(5));
            } else {
                self.issue_continue(host, ctx);
            }
        }
    }

    pub(super) fn issue_deadline(&self, ctx: ContextId, call: CallId) -> Option<u64> {
        match self.issuing(ctx).map(|i| &i.step) {
            Some(IssueStep::StsInFlight { call: c, deadline_ms }) if *c == call => Some(*deadline_ms),
            _ => Some(0),
        }
    }
}

impl Lifecycle {
    fn issuing(&self, ctx: ContextId) -> Option<&Issuing> {
        match self.streams.get(&ctx) {
            Some(Stream::Issuing(i)) => Some(i),
            _ => None,
        }
    }

    fn issuing_mut(&mut self, ctx: ContextId) -> Option<&mut Issuing> {
        match self.streams.get_mut(&ctx) {
            Some(Stream::Issuing(i)) => Some(i),
            _ => None,
        }
    }

    /// End the issuance of `ctx`: its record, if it was issuing (the stream stays known).
    fn take_issuing(&mut self, ctx: ContextId) -> Option<Issuing> {
        if !matches!(self.streams.get(&ctx), Some(Stream::Issuing(_))) {
            return None;
        }
        match self.streams.insert(ctx, Stream::Answered) {
            Some(Stream::Issuing(i)) => Some(*i),
            _ => None,
        }
    }

    /// The streams issuing on this worker, in order.
    fn issuing_streams(&self) -> Vec<ContextId> {
        let mut out: Vec<ContextId> = self.streams.iter().filter(|(_, s)| matches!(s, Stream::Issuing(_))).map(|(c, _)| *c).collect();
        out.sort_unstable();
        out
    }
}
