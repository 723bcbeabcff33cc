//! `keyward report ACCESS_LOG...`: who called what, from Envoy's JSON access log, without a
//! dashboard. Given every gateway's log, the figures are the fleet's.
//!
//! Reads one JSON object per line (lines that are not JSON, such as Envoy's own log interleaved on
//! stdout, are skipped and counted). Uses the contract's keys: `subject`, `target`, `decision`,
//! `cache`, `status`, and `duration_ms` (or `duration`) for latency; `run`, `jti`, `cost`,
//! `spend` and `budgets` for what priced requests spent, per credential and per fleet-ledger
//! budget; `model`, `tokens_in`, `tokens_out` and `usage` for model calls priced from their
//! usage. A missing value, `null`, `""` or Envoy's `-` all mean "not set".

use crate::args::{Args, Fail};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Counts {
    pub calls: u64,
    pub allowed: u64,
    pub denied: u64,
    latencies: Vec<f64>,
}

impl Counts {
    fn add(&mut self, allowed: bool, latency: Option<f64>) {
        self.calls += 1;
        if allowed {
            self.allowed += 1;
        } else {
            self.denied += 1;
        }
        if let Some(l) = latency {
            self.latencies.push(l);
        }
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub lines: u64,
    pub skipped: u64,
    /// Requests the filter did not decide (no `decision`: a route without a target, a 404).
    pub undecided: u64,
    pub total: Counts,
    pub by_caller: BTreeMap<(String, String), Counts>,
    pub by_target: BTreeMap<String, Counts>,
    pub denials: BTreeMap<String, u64>,
    pub cache: BTreeMap<String, u64>,
    /// Credentials the issuing endpoint issued, per subject (not vendor calls).
    pub issued: BTreeMap<String, u64>,
    /// What priced requests spent, per (subject, run, target), in the target's cost unit.
    pub spend: BTreeMap<(String, String, String), Spent>,
    /// The same per credential (subject, jti): what its caps count.
    pub credentials: BTreeMap<(String, String), Spent>,
    /// The same per fleet-ledger budget.
    pub budgets: BTreeMap<String, Spent>,
    /// Model calls priced from their usage, per (target, model).
    pub models: BTreeMap<(String, String), Usage>,
}

/// Model calls' tokens and cost, as their vendor reported them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Usage {
    pub calls: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// What they cost (a call whose usage was not read counts its whole reservation).
    pub cost: u64,
    /// Calls whose usage could not be read (cut, compressed, without usage).
    pub unread: u64,
}

/// The costs of admitted priced requests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Spent {
    /// Admitted requests that cost something (retries included).
    pub requests: u64,
    /// Their costs, retries left out (the vendor deduplicates a retry).
    pub charged: u64,
    /// Costs released because the vendor said the charge did not happen.
    pub refunded: u64,
    pub retries: u64,
}

impl Spent {
    pub fn net(&self) -> u64 {
        self.charged.saturating_sub(self.refunded)
    }

    fn add(&mut self, cost: u64, spend: Option<&str>) {
        self.requests += 1;
        match spend {
            Some("retry") => self.retries += 1,
            Some("refunded") => {
                self.charged += cost;
                self.refunded += cost;
            }
            _ => self.charged += cost,
        }
    }

    fn json(&self) -> Value {
        json!({"requests": self.requests, "charged": self.charged, "refunded": self.refunded, "net": self.net(), "retries": self.retries})
    }
}

/// A field's text, treating absent, null, "" and "-" as unset.
fn text(v: &Value, key: &str) -> Option<String> {
    let s = match v.get(key)? {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => return None,
    };
    (!s.is_empty() && s != "-").then_some(s)
}

fn number(v: &Value, keys: &[&str]) -> Option<f64> {
    keys.iter().find_map(|k| match v.get(*k)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    })
}

/// Nearest-rank percentile of `xs` (sorted in place); `None` when empty.
pub fn percentile(xs: &mut [f64], p: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * xs.len() as f64).ceil() as usize;
    xs.get(rank.clamp(1, xs.len()) - 1).copied()
}

impl Report {
    pub fn add_line(&mut self, line: &str) {
        let line = line.trim();
        if line.is_empty() {
            return;
        }
        self.lines += 1;
        let v: Value = match serde_json::from_str(line) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                self.skipped += 1;
                return;
            }
        };
        let Some(decision) = text(&v, "decision") else {
            self.undecided += 1;
            return;
        };
        if decision == "issued" {
            *self.issued.entry(text(&v, "subject").unwrap_or_else(|| "(unknown)".into())).or_default() += 1;
            return;
        }
        let allowed = decision == "allow";
        let latency = number(&v, &["duration_ms", "duration"]);
        let subject = text(&v, "subject").unwrap_or_else(|| "(unauthenticated)".into());
        let target = text(&v, "target").unwrap_or_else(|| "(none)".into());
        self.total.add(allowed, latency);
        self.by_caller.entry((subject.clone(), target.clone())).or_default().add(allowed, latency);
        if let (true, Some(cost)) = (allowed, number(&v, &["cost"]).filter(|c| *c >= 0.0)) {
            let cost = cost as u64;
            let spend = text(&v, "spend");
            let key = (subject.clone(), text(&v, "run").unwrap_or_else(|| "-".into()), target.clone());
            self.spend.entry(key).or_default().add(cost, spend.as_deref());
            let jti = text(&v, "jti").unwrap_or_else(|| "-".into());
            self.credentials.entry((subject.clone(), jti)).or_default().add(cost, spend.as_deref());
            for b in text(&v, "budgets").iter().flat_map(|b| b.split(',')).filter(|b| !b.is_empty()) {
                self.budgets.entry(b.to_string()).or_default().add(cost, spend.as_deref());
            }
            if let Some(model) = text(&v, "model") {
                let u = self.models.entry((target.clone(), model)).or_default();
                u.calls += 1;
                u.cost += cost;
                u.tokens_in += number(&v, &["tokens_in"]).map_or(0, |n| n as u64);
                u.tokens_out += number(&v, &["tokens_out"]).map_or(0, |n| n as u64);
                if text(&v, "usage").as_deref() != Some("read") {
                    u.unread += 1;
                }
            }
        }
        self.by_target.entry(target).or_default().add(allowed, latency);
        if !allowed {
            *self.denials.entry(decision).or_default() += 1;
        }
        if let Some(c) = text(&v, "cache") {
            *self.cache.entry(c).or_default() += 1;
        }
    }

    /// Add another log (another gateway's) to this report.
    pub fn read_into(&mut self, r: impl Read) -> std::io::Result<()> {
        for line in BufReader::new(r).split(b'\n') {
            self.add_line(&String::from_utf8_lossy(&line?));
        }
        Ok(())
    }

    fn top_denials(&self, n: usize) -> Vec<(&str, u64)> {
        let mut d: Vec<(&str, u64)> = self.denials.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        d.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        d.truncate(n);
        d
    }

    pub fn to_json(&self, top: usize) -> Value {
        fn lat(c: &Counts) -> Value {
            let mut xs = c.latencies.clone();
            json!({"p50": percentile(&mut xs, 50.0), "p90": percentile(&mut xs, 90.0),
                   "p99": percentile(&mut xs, 99.0), "max": percentile(&mut xs, 100.0)})
        }
        let callers: Vec<Value> = self
            .by_caller
            .iter()
            .map(|((s, t), c)| json!({"subject": s, "target": t, "calls": c.calls, "allowed": c.allowed, "denied": c.denied, "latency_ms": lat(c)}))
            .collect();
        let targets: Map<String, Value> = self
            .by_target
            .iter()
            .map(|(t, c)| (t.clone(), json!({"calls": c.calls, "allowed": c.allowed, "denied": c.denied, "latency_ms": lat(c)})))
            .collect();
        json!({
            "lines": self.lines, "skipped": self.skipped, "undecided": self.undecided,
            "requests": self.total.calls, "allowed": self.total.allowed, "denied": self.total.denied,
            "latency_ms": lat(&self.total),
            "callers": callers, "targets": targets,
            "top_denials": self.top_denials(top).iter().map(|(k, v)| json!({"decision": k, "count": v})).collect::<Vec<_>>(),
            "cache": self.cache,
            "issued": self.issued,
            "spend": self.spend.iter().map(|((s, r, t), e)| json!({"subject": s, "run": r, "target": t, "requests": e.requests,
                "charged": e.charged, "refunded": e.refunded, "net": e.net(), "retries": e.retries})).collect::<Vec<_>>(),
            "credentials": self.credentials.iter().map(|((s, j), e)| json!({"subject": s, "jti": j, "requests": e.requests,
                "charged": e.charged, "refunded": e.refunded, "net": e.net(), "retries": e.retries})).collect::<Vec<_>>(),
            "budgets": self.budgets.iter().map(|(b, e)| (b.clone(), e.json())).collect::<Map<String, Value>>(),
            "models": self.models.iter().map(|((t, m), u)| json!({"target": t, "model": m, "calls": u.calls, "tokens_in": u.tokens_in,
                "tokens_out": u.tokens_out, "cost": u.cost, "unread": u.unread})).collect::<Vec<_>>(),
        })
    }

    pub fn to_text(&self, top: usize) -> String {
        fn ms(x: Option<f64>) -> String {
            x.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
        }
        fn lat(c: &Counts) -> [String; 3] {
            let mut xs = c.latencies.clone();
            [ms(percentile(&mut xs, 50.0)), ms(percentile(&mut xs, 90.0)), ms(percentile(&mut xs, 99.0))]
        }
        let mut o = String::new();
        o.push_str(&format!(
            "{} requests decided by keyward: {} allowed, {} denied ({} other lines, {} not JSON)\n",
            self.total.calls, self.total.allowed, self.total.denied, self.undecided, self.skipped
        ));
        if !self.issued.is_empty() {
            let list: Vec<String> = self.issued.iter().map(|(s, n)| format!("{s} {n}")).collect();
            o.push_str(&format!("credentials issued: {}\n", list.join(", ")));
        }
        let [p50, p90, p99] = lat(&self.total);
        o.push_str(&format!("latency ms (Envoy's %DURATION%): p50 {p50}  p90 {p90}  p99 {p99}\n"));
        if !self.cache.is_empty() {
            let c: Vec<String> = self.cache.iter().map(|(k, v)| format!("{k} {v}")).collect();
            o.push_str(&format!("secret cache: {}\n", c.join(", ")));
        }
        o.push_str("\nwho called what\n");
        let w = self.by_caller.keys().map(|(s, _)| s.len()).max().unwrap_or(7).max(7);
        let wt = self.by_caller.keys().map(|(_, t)| t.len()).max().unwrap_or(6).max(6);
        o.push_str(&format!("  {:<w$}  {:<wt$}  {:>7}  {:>7}  {:>6}  {:>6}  {:>6}\n", "subject", "target", "allowed", "denied", "p50", "p90", "p99"));
        for ((s, t), c) in &self.by_caller {
            let [p50, p90, p99] = lat(c);
            o.push_str(&format!("  {s:<w$}  {t:<wt$}  {:>7}  {:>7}  {p50:>6}  {p90:>6}  {p99:>6}\n", c.allowed, c.denied));
        }
        o.push_str("\nper target\n");
        for (t, c) in &self.by_target {
            let [p50, p90, p99] = lat(c);
            o.push_str(&format!("  {t:<wt$}  {:>7} allowed  {:>7} denied  p50 {p50} p90 {p90} p99 {p99} ms\n", c.allowed, c.denied));
        }
        if !self.spend.is_empty() {
            o.push_str("\nspend (in each target's cost unit; retries are not charged again)\n");
            let ws = self.spend.keys().map(|(s, _, _)| s.len()).max().unwrap_or(7).max(7);
            let wr = self.spend.keys().map(|(_, r, _)| r.len()).max().unwrap_or(3).max(3);
            o.push_str(&format!(
                "  {:<ws$}  {:<wr$}  {:<wt$}  {:>8}  {:>12}  {:>12}  {:>12}  {:>7}\n",
                "subject", "run", "target", "requests", "charged", "refunded", "net", "retries"
            ));
            for ((s, r, t), e) in &self.spend {
                o.push_str(&format!(
                    "  {s:<ws$}  {r:<wr$}  {t:<wt$}  {:>8}  {:>12}  {:>12}  {:>12}  {:>7}\n",
                    e.requests,
                    e.charged,
                    e.refunded,
                    e.net(),
                    e.retries
                ));
            }
        }
        if !self.credentials.is_empty() {
            o.push_str("\nspend per credential (what its caps count; every gateway's log gives the fleet's)\n");
            let ws = self.credentials.keys().map(|(s, _)| s.len()).max().unwrap_or(7).max(7);
            let wj = self.credentials.keys().map(|(_, j)| j.len()).max().unwrap_or(3).max(3);
            o.push_str(&format!("  {:<ws$}  {:<wj$}  {:>8}  {:>12}  {:>12}  {:>12}\n", "subject", "jti", "requests", "charged", "refunded", "net"));
            for ((s, j), e) in &self.credentials {
                o.push_str(&format!("  {s:<ws$}  {j:<wj$}  {:>8}  {:>12}  {:>12}  {:>12}\n", e.requests, e.charged, e.refunded, e.net()));
            }
        }
        if !self.budgets.is_empty() {
            o.push_str("\nspend per budget (the fleet ledger's budgets)\n");
            let wb = self.budgets.keys().map(String::len).max().unwrap_or(6).max(6);
            o.push_str(&format!("  {:<wb$}  {:>8}  {:>12}  {:>12}  {:>12}\n", "budget", "requests", "charged", "refunded", "net"));
            for (b, e) in &self.budgets {
                o.push_str(&format!("  {b:<wb$}  {:>8}  {:>12}  {:>12}  {:>12}\n", e.requests, e.charged, e.refunded, e.net()));
            }
        }
        if !self.models.is_empty() {
            o.push_str("\nmodel calls (tokens as the vendor reported them; cost in the cap's unit)\n");
            let wm = self.models.keys().map(|(_, m)| m.len()).max().unwrap_or(5).max(5);
            o.push_str(&format!(
                "  {:<wt$}  {:<wm$}  {:>7}  {:>12}  {:>12}  {:>12}  {:>6}\n",
                "target", "model", "calls", "tokens in", "tokens out", "cost", "unread"
            ));
            for ((t, m), u) in &self.models {
                o.push_str(&format!("  {t:<wt$}  {m:<wm$}  {:>7}  {:>12}  {:>12}  {:>12}  {:>6}\n", u.calls, u.tokens_in, u.tokens_out, u.cost, u.unread));
            }
        }
        let top = self.top_denials(top);
        if !top.is_empty() {
            o.push_str("\ntop denial reasons\n");
            for (d, n) in top {
                o.push_str(&format!("  {n:>7}  {d}\n"));
            }
        }
        o
    }
}

pub fn run(args: &[String]) -> Result<(), Fail> {
    let a = Args::read(args, &[], &["top"], usize::MAX)?;
    let top: usize = a.get("top").map_or(Ok(10), str::parse).map_err(|_| Fail::usage("--top needs a number"))?;
    if a.positional.is_empty() {
        return Err(Fail::usage("an ACCESS_LOG (or - for standard input) is required; give every gateway's for the fleet's figures"));
    }
    let mut rep = Report::default();
    for path in &a.positional {
        let read = if path == "-" {
            rep.read_into(std::io::stdin().lock())
        } else {
            rep.read_into(std::fs::File::open(path).map_err(|e| Fail::unavailable(format!("cannot read {path}: {e}")))?)
        };
        read.map_err(|e| Fail::unavailable(format!("cannot read {path}: {e}")))?;
    }
    if a.flag("json") {
        println!("{}", serde_json::to_string_pretty(&rep.to_json(top)).map_err(|e| e.to_string())?);
    } else {
        print!("{}", rep.to_text(top));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = r#"
[2026-11-28 00:00:00.000][1][info][main] starting main dispatch loop
{"subject":"lambda/a","target":"stripe","decision":"allow","status":200,"duration_ms":12,"cache":"hit"}
{"subject":"lambda/a","target":"stripe","decision":"allow","status":200,"duration_ms":"30","cache":"miss"}
{"subject":"lambda/a","target":"stripe","decision":"forbidden","status":403,"duration_ms":1}
{"subject":"lambda/b","target":"openai","decision":"allow","status":200,"duration_ms":100,"cache":"stale"}
{"subject":null,"target":"openai","decision":"missing_credential","status":401,"duration_ms":0}
{"subject":"-","target":"-","decision":"invalid_credential","status":401,"duration_ms":0}
{"subject":"lambda/b","target":"openai","decision":"forbidden","status":403,"duration_ms":2}
{"path":"/nowhere","status":404,"decision":null}
not json at all
[1,2]
"#;

    fn report() -> Report {
        let mut r = Report::default();
        for l in LOG.lines() {
            r.add_line(l);
        }
        r
    }

    #[test]
    fn counts_calls_and_denials_per_subject_and_target() {
        let r = report();
        assert_eq!(r.lines, 11);
        assert_eq!(r.skipped, 3, "Envoy's own log line, a non-JSON line and a JSON array");
        assert_eq!(r.undecided, 1);
        assert_eq!((r.total.calls, r.total.allowed, r.total.denied), (7, 3, 4));
        let a = &r.by_caller[&("lambda/a".to_string(), "stripe".to_string())];
        assert_eq!((a.calls, a.allowed, a.denied), (3, 2, 1));
        let anon = &r.by_caller[&("(unauthenticated)".to_string(), "openai".to_string())];
        assert_eq!(anon.denied, 1);
        assert!(r.by_caller.contains_key(&("(unauthenticated)".to_string(), "(none)".to_string())));
        assert_eq!(r.by_target["openai"].calls, 3);
        assert_eq!(r.top_denials(2), vec![("forbidden", 2), ("invalid_credential", 1)]);
        assert_eq!(r.cache.get("stale"), Some(&1));
    }

    #[test]
    fn issuances_are_counted_apart_from_calls() {
        let mut r = Report::default();
        r.add_line(r#"{"decision":"issued","subject":"lambda/checkout","issued":"j1","run":"sqs/1"}"#);
        r.add_line(r#"{"decision":"allow","subject":"lambda/checkout","target":"stripe","run":"sqs/1"}"#);
        assert_eq!((r.total.calls, r.total.denied), (1, 0), "an issuance is neither a call nor a denial");
        assert_eq!(r.issued.get("lambda/checkout"), Some(&1));
        assert!(r.to_text(5).contains("credentials issued: lambda/checkout 1"));
    }

    #[test]
    fn spend_per_subject_run_and_target_with_refunds_and_retries() {
        let mut r = Report::default();
        for l in [
            r#"{"decision":"allow","subject":"lambda/pay","run":"sqs/1","target":"stripe","cost":"6000","spend":"reserved"}"#,
            r#"{"decision":"allow","subject":"lambda/pay","run":"sqs/1","target":"stripe","cost":"6000","spend":"retry"}"#,
            r#"{"decision":"allow","subject":"lambda/pay","run":"sqs/1","target":"stripe","cost":"2500","spend":"refunded"}"#,
            r#"{"decision":"spend_exhausted","subject":"lambda/pay","run":"sqs/1","target":"stripe","cost":"9000"}"#,
            r#"{"decision":"allow","subject":"lambda/pay","run":"sqs/2","target":"stripe","cost":"100","spend":"uncapped"}"#,
            r#"{"decision":"allow","subject":"lambda/pay","run":"-","target":"stripe","cost":"-"}"#,
        ] {
            r.add_line(l);
        }
        let one = &r.spend[&("lambda/pay".to_string(), "sqs/1".to_string(), "stripe".to_string())];
        assert_eq!(one, &Spent { requests: 3, charged: 8500, refunded: 2500, retries: 1 });
        assert_eq!(one.net(), 6000);
        assert_eq!(r.spend[&("lambda/pay".to_string(), "sqs/2".to_string(), "stripe".to_string())].net(), 100);
        assert_eq!(r.spend.len(), 2, "a request without a cost spends nothing, a refused one neither");
        let t = r.to_text(5);
        assert!(t.contains("spend (in each target's cost unit"), "{t}");
        assert_eq!(r.to_json(5)["spend"][0]["net"], json!(6000));
    }

    #[test]
    fn latency_percentiles_use_nearest_rank() {
        let mut xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut xs, 50.0), Some(50.0));
        assert_eq!(percentile(&mut xs, 99.0), Some(99.0));
        assert_eq!(percentile(&mut xs, 100.0), Some(100.0));
        assert_eq!(percentile(&mut [7.0], 1.0), Some(7.0));
        assert_eq!(percentile(&mut [], 50.0), None);
        let j = report().to_json(10);
        assert_eq!(j["latency_ms"]["p50"], json!(2.0));
        assert_eq!(j["latency_ms"]["max"], json!(100.0));
        assert_eq!(j["targets"]["stripe"]["latency_ms"]["p99"], json!(30.0));
    }

    #[test]
    fn text_report_names_callers_and_reasons() {
        let t = report().to_text(10);
        assert!(t.starts_with("7 requests decided by keyward: 3 allowed, 4 denied"), "{t}");
        assert!(t.contains("lambda/a"));
        assert!(t.contains("top denial reasons"));
        assert!(t.contains("      2  forbidden"));
    }

    #[test]
    fn spend_per_credential_and_per_budget_across_gateways_logs() {
        let g1 = r#"{"decision":"allow","subject":"lambda/checkout-a","jti":"j1","target":"stripe","cost":"6000","spend":"reserved","budgets":"checkout"}
{"decision":"allow","subject":"lambda/checkout-a","jti":"j1","target":"stripe","cost":"6000","spend":"retry"}"#;
        let g2 = r#"{"decision":"allow","subject":"lambda/checkout-b","jti":"j2","target":"stripe","cost":"2500","spend":"refunded","budgets":"checkout,all"}
{"decision":"allow","subject":"lambda/checkout-a","jti":"j1","target":"stripe","cost":"1000","spend":"reserved","budgets":"checkout"}
{"decision":"spend_exhausted","subject":"lambda/checkout-a","jti":"j1","target":"stripe","cost":"9000","budgets":"checkout"}"#;
        let mut r = Report::default();
        r.read_into(g1.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        r.read_into(g2.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        let j1 = &r.credentials[&("lambda/checkout-a".to_string(), "j1".to_string())];
        assert_eq!((j1.requests, j1.net(), j1.retries), (3, 7000, 1), "both gateways' requests, the retry not charged again");
        assert_eq!((r.budgets["checkout"].net(), r.budgets["checkout"].refunded, r.budgets["all"].net()), (7000, 2500, 0));
        let t = r.to_text(5);
        assert!(t.contains("spend per credential") && t.contains("spend per budget"), "{t}");
        assert_eq!(r.to_json(5)["budgets"]["checkout"]["net"], json!(7000));
    }

    #[test]
    fn model_calls_are_summed_per_target_and_model() {
        let log = r#"{"decision":"allow","subject":"agent/a","jti":"j1","target":"openai","model":"gpt-4o","cost":"120","reserved":"900","usage":"read","tokens_in":"40","tokens_out":"10","spend":"reserved"}
{"decision":"allow","subject":"agent/a","jti":"j1","target":"openai","model":"gpt-4o","cost":"900","reserved":"900","usage":"unread","spend":"reserved"}
{"decision":"spend_exhausted","subject":"agent/a","jti":"j1","target":"openai","model":"gpt-4o","cost":"900"}"#;
        let mut r = Report::default();
        for l in log.lines() {
            r.add_line(l);
        }
        let u = &r.models[&("openai".to_string(), "gpt-4o".to_string())];
        assert_eq!((u.calls, u.tokens_in, u.tokens_out, u.cost, u.unread), (2, 40, 10, 1020, 1));
        assert_eq!(r.credentials[&("agent/a".to_string(), "j1".to_string())].net(), 1020);
        assert!(r.to_text(5).contains("model calls"));
    }
}
