//! `keyward`: mint and inspect workload credentials, validate configurations, edit the
//! revocation list, summarise access logs.

mod args;
mod aws;
mod config_sync;
mod envoy_lint;
mod issue;
mod lint_ratelimit;
mod lint_report;
mod native_config;
mod report;
mod revoke;
mod token;

use args::{Args, Fail};
use keyward_core::config;
use keyward_core::wire::b64;
use serde_json::json;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

/// Each command's usage, printed by `keyward help`, `keyward help CMD` and `keyward CMD --help`.
const COMMANDS: &[(&str, &str)] = &[
    (
        "mint",
        "keyward mint --kid KID (--key-env VAR | --key-file PATH) --sub SUB --allow RULE [--allow RULE ...]
             [--ttl SECONDS] [--aud AUD] [--iss ISS] [--run LABEL] [--rpm N] [--total N] [--spend N]
             [--jti ID] [--json]
    Print a signed HS256 credential. RULE is \"<target> <METHOD> <path-pattern>\". --spend N caps the
    sum of its requests' costs (in each target's cost unit, e.g. US cents: 10000 is 100.00 USD).
    Defaults: --ttl 900, --aud keyward, a random --jti. With --json: {token, kid, sub, jti, iat, exp, run}.",
    ),
    (
        "inspect",
        "keyward inspect [TOKEN|-] [--key-env VAR | --key-file PATH] [--config FILE]
             [--aud AUD] [--iss ISS] [--max-lifetime S] [--skew S] [--json]
    Decode a credential, verify it and say exactly why it fails. Exit 0 when valid, 1 when not.
    With --config, the key (by kid, from the environment) and the policy come from a filter config.
    With --json: {valid, kid, header, claims, expires_in | error: {kind, message}}.",
    ),
    (
        "check-config",
        "keyward check-config FILE [--no-env] [--json]
    Validate a filter configuration (JSON, or an ECDS file holding one, as config-sync writes it
    and the EKS keyward-filter ConfigMap holds it). --no-env checks structure without the
    environment.",
    ),
    (
        "check-envoy",
        "keyward check-envoy FILE.yaml [--no-env] [--json]
    Lint an Envoy bootstrap that runs Keyward: route metadata vs. prefixes, failure_policy, path
    normalisation, access logs, and the embedded filter configuration. Exit 1 on any problem.",
    ),
    (
        "config-sync",
        "keyward config-sync --source SOURCE --template FILE --out FILE [--every SECONDS] [--region R]
             [--no-env] [--json]
    Deliver the filter configuration to a running Envoy (ECDS from a watched file). SOURCE is
    ssm:NAME (an SSM parameter, decrypted; AWS credentials from the SDK's default chain),
    env:VAR or file:PATH. The configuration is checked as check-config checks it, put into the
    ECDS resource TEMPLATE and written to FILE by a rename when it changed. A configuration that
    does not compile is refused and FILE keeps the last good one. Without --every: one round,
    whose failure is the exit code. With --every: a round every SECONDS, forever, each event
    logged on stderr (with --json: one JSON object per event on stdout).",
    ),
    (
        "revoke",
        "keyward revoke (--jti ID | --sub SUBJECT) [--reason TEXT] [--expires-at EXP] [--prune] [LIST] [--json]
    Add the credential (or every credential of a workload) to the revocation list in Vault or
    OpenBao. Gateways deny it within their revocation refresh_s plus one second. EXP is the
    credential's exp (Unix seconds, as `keyward inspect` shows it): once it has passed, the
    entry no longer matters, gateways drop it, and --prune deletes it (alone, or with a
    revocation).
    LIST is --config FILE (the filter configuration's revocation store and path), or
    [--mount MOUNT] [--path PATH] (default: secret, keyward/revoked).
    Environment: VAULT_ADDR, VAULT_TOKEN (or ~/.vault-token), VAULT_NAMESPACE, VAULT_CACERT.",
    ),
    (
        "unrevoke",
        "keyward unrevoke (--jti ID | --sub SUBJECT) [LIST] [--json]
    Remove an entry from the revocation list (LIST and environment as for revoke).",
    ),
    (
        "revoked",
        "keyward revoked [LIST] [--json]
    List the revocation list's entries and reasons (LIST and environment as for revoke).",
    ),
    (
        "report",
        "keyward report ACCESS_LOG|- [ACCESS_LOG...] [--json] [--top N]
    Summarise JSON access logs: calls and denials per subject and target, the top denial
    reasons, latency percentiles, spend per credential and per fleet-ledger budget. Give every
    gateway's log for the fleet's figures. Lines that are not JSON are skipped.",
    ),
    (
        "token",
        "keyward token --aws --url GATEWAY --server-id ID [--allow RULE ...] [--ttl S] [--run LABEL]
             [--region R] [--sts-host HOST] [--path PATH] [--json]
      keyward token --attenuate --url GATEWAY (--token T | --token-env VAR) [--allow RULE ...] [--ttl S]
             [--run LABEL] [--rpm N] [--total N] [--spend N] [--path PATH] [--json]
    Get a credential from a gateway's issuing endpoint (default path /keyward/v1/credentials).
    --aws: for the current AWS identity, found as the AWS CLI finds it (environment, AWS_PROFILE
    and SSO, web identity, the ECS/EKS container role, instance metadata): a signed
    sts:GetCallerIdentity the gateway has STS check. --attenuate: a child of the given
    credential, within it in every dimension. Prints the token (with --json: {token, jti, sub,
    expires_at, allow}).",
    ),
    (
        "native-config",
        "keyward native-config FILE [--out FILE]
    Rewrite an Envoy bootstrap or ECDS file that runs Keyward's wasm filter to run the native
    module (libkeyward.so, Envoy's dynamic-modules filter) with the same configuration; YAML out,
    or JSON when --out ends in .json. The module is found under ENVOY_DYNAMIC_MODULES_SEARCH_PATH.",
    ),
    ("version", "keyward version [--json]"),
];

const EXIT_CODES: &str = "EXIT CODES:
  0  done, or the check passed
  1  the check failed or the operation was refused (invalid credential, configuration errors,
     problems in an Envoy bootstrap, an entry that is not in the list)
  2  usage error (unknown command or option, missing or malformed value)
  3  could not run to the end (a file that cannot be read, a store that cannot be reached)
Every command takes --json (machine-readable output; failures as {\"error\": {kind, message}})
and --help; --name=value and --name value are the same.
";

fn help(command: Option<&str>) -> String {
    match command.and_then(|c| COMMANDS.iter().find(|(n, _)| *n == c)) {
        Some((_, text)) => format!("USAGE:\n  {text}\n\n{EXIT_CODES}"),
        None => {
            let mut s = String::from("keyward: scoped workload credentials for Keyward\n\nUSAGE:\n");
            for (_, text) in COMMANDS {
                s.push_str("  ");
                s.push_str(text);
                s.push('\n');
            }
            s.push('\n');
            s.push_str(EXIT_CODES);
            s
        }
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let cmd = args.next();
    let rest: Vec<String> = args.collect();
    let json = rest.iter().take_while(|a| *a != "--").any(|a| a == "--json");
    let wants_help = rest.iter().take_while(|a| *a != "--").any(|a| a == "--help" || a == "-h");
    let r = match cmd.as_deref() {
        Some(c) if wants_help && COMMANDS.iter().any(|(n, _)| *n == c) => {
            print!("{}", help(Some(c)));
            Ok(())
        }
        Some("mint") => token::mint(&rest),
        Some("inspect") => token::inspect(&rest),
        Some("check-config") => check_config(&rest),
        Some("check-envoy") => envoy_lint::run(&rest),
        Some("config-sync") => config_sync::run(&rest),
        Some("revoke") => revoke::revoke(&rest),
        Some("unrevoke") => revoke::unrevoke(&rest),
        Some("revoked") => revoke::list(&rest),
        Some("report") => report::run(&rest),
        Some("token") => issue::run(&rest),
        Some("native-config") => native_config::run(&rest),
        Some("version" | "--version") => version(&rest),
        Some("help" | "--help" | "-h") | None => match rest.first() {
            Some(c) if !COMMANDS.iter().any(|(n, _)| n == c) => Err(Fail::usage(format!("unknown command {c:?}; see `keyward help`"))),
            c => {
                print!("{}", help(c.map(String::as_str)));
                Ok(())
            }
        },
        Some(other) => Err(Fail::usage(format!("unknown command {other:?}; see `keyward help`"))),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if e.message().is_empty() {
                // Already reported on stdout.
            } else if json {
                println!("{}", json!({ "error": { "kind": e.kind(), "message": e.message() } }));
            } else {
                eprintln!("keyward: {e}");
                if let (Fail::Usage(_), Some(c)) = (&e, cmd.as_deref()) {
                    if COMMANDS.iter().any(|(n, _)| *n == c) {
                        eprintln!("see `keyward {c} --help`");
                    }
                }
            }
            ExitCode::from(e.exit_code())
        }
    }
}

fn version(args: &[String]) -> Result<(), Fail> {
    let a = Args::read(args, &[], &[], 0)?;
    if a.json() {
        println!("{}", json!({ "version": env!("CARGO_PKG_VERSION") }));
    } else {
        println!("keyward {}", env!("CARGO_PKG_VERSION"));
    }
    Ok(())
}

pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn check_config(args: &[String]) -> Result<(), Fail> {
    let a = Args::read(args, &["no-env"], &[], 1)?;
    let path = a.positional.first().ok_or_else(|| Fail::usage("a FILE is required"))?;
    let bytes = std::fs::read(path).map_err(|e| Fail::unavailable(format!("cannot read {path}: {e}")))?;
    let bytes = ecds_configuration(&bytes).unwrap_or(bytes);
    match (compile_for_check(&bytes, a.flag("no-env")), a.json()) {
        (Ok(cfg), false) => println!("ok: {}", cfg.summary()),
        (Ok(cfg), true) => println!("{}", json!({ "ok": true, "summary": cfg.summary() })),
        (Err(e), false) => return Err(Fail::Failed(format!("{path}: {e}"))),
        (Err(e), true) => {
            println!("{}", json!({ "ok": false, "error": { "kind": "failed", "message": e.to_string() } }));
            return Err(Fail::Failed(String::new()));
        }
    }
    Ok(())
}

/// The filter configuration inside an ECDS file (YAML or JSON: one resource, a Wasm filter whose
/// `configuration.value` is the configuration, or the native module's `filter_config.value`), as `config-sync` writes it and the EKS
/// `keyward-filter` ConfigMap holds it; `None` for anything else.
fn ecds_configuration(bytes: &[u8]) -> Option<Vec<u8>> {
    let doc: serde_json::Value = serde_norway::from_slice(bytes).ok()?;
    let [one] = doc.get("resources")?.as_array()?.as_slice() else { return None };
    // The wasm filter's configuration, or the native module's.
    let v = one.pointer("/typed_config/config/configuration/value").or_else(|| one.pointer("/typed_config/filter_config/value"))?;
    v.as_str().map(|v| v.as_bytes().to_vec())
}

/// With `no_env`, every environment variable reads as a placeholder 32-byte key, so that the
/// structure can be checked where the secrets are not present (CI).
pub fn compile_for_check(bytes: &[u8], no_env: bool) -> Result<config::Config, config::ConfigError> {
    if no_env {
        let placeholder = |_: &str| Some(b64::std_encode(&[0x5a; 32]));
        config::compile(bytes, &placeholder)
    } else {
        let env = |n: &str| std::env::var(n).ok();
        config::compile(bytes, &env)
    }
}
