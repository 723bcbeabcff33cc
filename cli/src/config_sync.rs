//! `keyward config-sync`: deliver the filter configuration to Envoy at run time. It reads the
//! configuration from its source (an SSM parameter, an environment variable or a file), checks it
//! with the filter's own compiler, wraps it in the ECDS resource template (the Wasm filter's VM
//! settings, shipped next to the bootstrap) and replaces the file Envoy watches with a rename, so
//! that Envoy applies it to the next requests without a restart. A configuration that does not
//! compile is refused here, logged, and the file keeps the last good one; Envoy and the filter
//! refuse what gets past this check in the same way (ECDS `update_rejected`).

use crate::args::{Args, Fail};
use crate::aws::{self, Session};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::Duration;

/// Where the filter configuration comes from.
#[derive(Debug, PartialEq, Eq)]
pub enum Source {
    File(String),
    Env(String),
    /// An SSM parameter (name or ARN); SecureString parameters are decrypted.
    Ssm(String),
}

impl Source {
    pub fn parse(s: &str) -> Result<Source, Fail> {
        let (kind, rest) = s.split_once(':').ok_or_else(|| Fail::usage(format!("--source {s:?}: give file:PATH, env:VAR or ssm:NAME")))?;
        if rest.is_empty() {
            return Err(Fail::usage(format!("--source {s:?}: nothing after {kind}:")));
        }
        match kind {
            "file" => Ok(Source::File(rest.into())),
            "env" => Ok(Source::Env(rest.into())),
            "ssm" => Ok(Source::Ssm(rest.into())),
            _ => Err(Fail::usage(format!("--source {s:?}: give file:PATH, env:VAR or ssm:NAME"))),
        }
    }

    /// The configuration's text and, for SSM, its version.
    fn read(&self, region: Option<&str>) -> Result<(String, Option<i64>), Fail> {
        match self {
            Source::File(p) => std::fs::read_to_string(p).map(|t| (t, None)).map_err(|e| Fail::unavailable(format!("cannot read {p}: {e}"))),
            Source::Env(v) => std::env::var(v).map(|t| (t, None)).map_err(|_| Fail::unavailable(format!("environment variable {v} is not set"))),
            Source::Ssm(name) => {
                let session = Session::load(region)?;
                let region = session.region()?;
                let endpoint = aws::endpoint("ssm", "SSM", region);
                let v = session.call_json("ssm", region, &endpoint, "AmazonSSM.GetParameter", &json!({ "Name": name, "WithDecryption": true }))?;
                let value = v.pointer("/Parameter/Value").and_then(Value::as_str).ok_or_else(|| Fail::unavailable("SSM answered without Parameter.Value"))?;
                Ok((value.to_string(), v.pointer("/Parameter/Version").and_then(Value::as_i64)))
            }
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "file:{p}"),
            Source::Env(v) => write!(f, "env:{v}"),
            Source::Ssm(n) => write!(f, "ssm:{n}"),
        }
    }
}

/// The ECDS file's content: the template with `config` as the Wasm filter's configuration (or the
/// native module's, for a template `keyward native-config` rewrote).
pub fn render(template: &str, config: &str) -> Result<String, String> {
    let mut doc: Value = serde_json::from_str(template).map_err(|e| format!("the template is not JSON: {e}"))?;
    let resources = doc.get_mut("resources").and_then(Value::as_array_mut).ok_or("the template has no resources list")?;
    let [resource] = resources.as_mut_slice() else {
        return Err("the template must hold exactly one resource".into());
    };
    let kind = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or_default().to_string();
    let native = kind(resource, "/typed_config/@type").ends_with("filters.http.dynamic_modules.v3.DynamicModuleFilter");
    if !kind(resource, "/@type").ends_with("envoy.config.core.v3.TypedExtensionConfig")
        || !(native || kind(resource, "/typed_config/@type").ends_with("filters.http.wasm.v3.Wasm"))
    {
        return Err("the template's resource must be a TypedExtensionConfig holding a Wasm filter or the native module".into());
    }
    let path = if native { "/typed_config/filter_config" } else { "/typed_config/config/configuration" };
    let slot = resource.pointer_mut(path).ok_or("the template has no slot for the configuration")?;
    *slot = json!({ "@type": "type.googleapis.com/google.protobuf.StringValue", "value": config });
    serde_json::to_string_pretty(&doc).map(|s| s + "\n").map_err(|e| e.to_string())
}

/// The environment the template's Wasm VM gets: `host_env_keys` from this process, `key_values`
/// as given; the native module reads the whole environment.
fn vm_environment(template: &str) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    let Ok(doc) = serde_json::from_str::<Value>(template) else { return out };
    if doc.pointer("/resources/0/typed_config/filter_config").is_some() {
        return std::env::vars().collect();
    }
    let Some(env) = doc.pointer("/resources/0/typed_config/config/vm_config/environment_variables") else { return out };
    for k in env.get("host_env_keys").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
        if let Ok(v) = std::env::var(k) {
            out.insert(k.to_string(), v);
        }
    }
    for (k, v) in env.get("key_values").and_then(Value::as_object).into_iter().flatten() {
        if let Some(v) = v.as_str() {
            out.insert(k.clone(), v.to_string());
        }
    }
    out
}

/// Replaces `out` with `content` by a rename in its directory (what Envoy's watched directory
/// sees as one change), unless it already holds it. Returns whether it changed.
pub fn replace(out: &Path, content: &str) -> Result<bool, Fail> {
    if std::fs::read_to_string(out).is_ok_and(|old| old == content) {
        return Ok(false);
    }
    let dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = out.file_name().and_then(|n| n.to_str()).ok_or_else(|| Fail::usage(format!("--out {}: not a file name", out.display())))?;
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(content.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, out)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Fail::unavailable(format!("cannot write {}: {e}", out.display()))
    })?;
    Ok(true)
}

struct Sync {
    source: Source,
    template: String,
    out: std::path::PathBuf,
    region: Option<String>,
    no_env: bool,
}

impl Sync {
    /// One round: Ok(Some(what was applied)), Ok(None) when nothing changed.
    fn round(&self) -> Result<Option<String>, Fail> {
        let (text, version) = self.source.read(self.region.as_deref())?;
        let label = match version {
            Some(v) => format!("{} version {v}", self.source),
            None => self.source.to_string(),
        };
        let digest: String = Sha256::digest(text.as_bytes()).iter().take(6).map(|b| format!("{b:02x}")).collect();
        // Checked with the environment the filter's VM will have: the variables the template
        // hands it (host_env_keys, key_values), nothing else of this process's.
        let checked = if self.no_env {
            crate::compile_for_check(text.as_bytes(), true)
        } else {
            let vm = vm_environment(&self.template);
            keyward_core::config::compile(text.as_bytes(), &|n: &str| vm.get(n).cloned())
        };
        checked.map_err(|e| Fail::Failed(format!("refused {label} (sha256 {digest}…): {e}")))?;
        let content = render(&self.template, &text).map_err(|e| Fail::usage(format!("--template: {e}")))?;
        Ok(replace(&self.out, &content)?.then(|| format!("applied {label} (sha256 {digest}…) to {}", self.out.display())))
    }
}

pub fn run(args: &[String]) -> Result<(), Fail> {
    let a = Args::read(args, &["no-env"], &["source", "template", "out", "every", "region"], 0)?;
    let source = Source::parse(a.get("source").ok_or_else(|| Fail::usage("--source is required"))?)?;
    let template_path = a.get("template").ok_or_else(|| Fail::usage("--template (the ECDS resource template) is required"))?;
    let template = std::fs::read_to_string(template_path).map_err(|e| Fail::unavailable(format!("cannot read {template_path}: {e}")))?;
    render(&template, "{}").map_err(|e| Fail::usage(format!("--template {template_path}: {e}")))?;
    let out = a.get("out").ok_or_else(|| Fail::usage("--out (the file Envoy's ECDS watches) is required"))?;
    let every = a
        .get("every")
        .map(|v| v.parse::<u64>().ok().filter(|n| (1..=86_400).contains(n)).ok_or_else(|| Fail::usage("--every must be 1-86400 seconds")))
        .transpose()?;
    let sync = Sync { source, template, out: out.into(), region: a.get("region").map(str::to_string), no_env: a.flag("no-env") };
    let Some(every) = every else {
        // Once: the entrypoint's first round, before Envoy starts. Its failure is the command's.
        let done = sync.round()?;
        report(a.json(), "ok", done.as_deref().unwrap_or("unchanged"));
        return Ok(());
    };
    loop {
        match sync.round() {
            Ok(Some(done)) => report(a.json(), "applied", &done),
            Ok(None) => {}
            Err(e) => report(a.json(), e.kind(), &format!("{e}; {} keeps the last good configuration", sync.out.display())),
        }
        std::thread::sleep(Duration::from_secs(every));
    }
}

/// One line per event on stderr (the gateway's log), or one JSON object per event on stdout.
fn report(json: bool, event: &str, message: &str) {
    if json {
        println!("{}", json!({ "event": event, "message": message }));
    } else {
        eprintln!("keyward config-sync: {message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = r#"{"resources":[{"@type":"type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig","name":"keyward",
        "typed_config":{"@type":"type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm","config":{"name":"keyward",
        "configuration":{"@type":"type.googleapis.com/google.protobuf.StringValue","value":""}}}}]}"#;

    #[test]
    fn the_vm_sees_only_what_the_template_hands_it() {
        std::env::set_var("KEYWARD_SYNC_TEST_LISTED", "a");
        std::env::set_var("KEYWARD_SYNC_TEST_UNLISTED", "b");
        let t = TEMPLATE.replace(
            r#""configuration""#,
            r#""vm_config":{"environment_variables":{"host_env_keys":["KEYWARD_SYNC_TEST_LISTED","KEYWARD_SYNC_TEST_MISSING"],"key_values":{"FIXED":"c"}}},"configuration""#,
        );
        let env = vm_environment(&t);
        assert_eq!(env.get("KEYWARD_SYNC_TEST_LISTED").map(String::as_str), Some("a"));
        assert_eq!(env.get("FIXED").map(String::as_str), Some("c"));
        assert!(!env.contains_key("KEYWARD_SYNC_TEST_UNLISTED") && !env.contains_key("KEYWARD_SYNC_TEST_MISSING"));
    }

    #[test]
    fn sources() {
        assert_eq!(Source::parse("ssm:/keyward/prod/config"), Ok(Source::Ssm("/keyward/prod/config".into())));
        assert_eq!(Source::parse("env:KEYWARD_CONFIG"), Ok(Source::Env("KEYWARD_CONFIG".into())));
        assert_eq!(Source::parse("file:/etc/k.json"), Ok(Source::File("/etc/k.json".into())));
        for bad in ["ssm:", "s3://b/k", "/etc/k.json", ""] {
            assert!(matches!(Source::parse(bad), Err(Fail::Usage(_))), "{bad}");
        }
    }

    #[test]
    fn the_configuration_goes_into_the_wasm_filter_verbatim() {
        let out = render(TEMPLATE, "{\"audience\": \"k\"}").unwrap_or_default();
        let v: Value = serde_json::from_str(&out).unwrap_or_default();
        assert_eq!(v.pointer("/resources/0/typed_config/config/configuration/value").and_then(Value::as_str), Some("{\"audience\": \"k\"}"));
        assert_eq!(v.pointer("/resources/0/typed_config/config/name").and_then(Value::as_str), Some("keyward"));
    }

    #[test]
    fn the_configuration_goes_into_the_native_module_of_a_rewritten_template() {
        // The shipped template, as the image's entrypoint rewrites it for KEYWARD_EXECUTOR=native.
        let mut t: Value = serde_json::from_str(include_str!("../../envoy/keyward-filter.template.json")).unwrap_or_default();
        assert_eq!(crate::native_config::rewrite(&mut t), 1);
        let out = render(&t.to_string(), "{\"audience\": \"k\"}").unwrap_or_default();
        let v: Value = serde_json::from_str(&out).unwrap_or_default();
        assert_eq!(v.pointer("/resources/0/typed_config/filter_config/value").and_then(Value::as_str), Some("{\"audience\": \"k\"}"));
    }

    #[test]
    fn templates_that_are_not_one_wasm_filter_are_refused() {
        assert!(render("[]", "{}").is_err());
        assert!(render(r#"{"resources":[]}"#, "{}").is_err());
        assert!(render(&TEMPLATE.replace("wasm.v3.Wasm", "lua.v3.Lua"), "{}").is_err());
        let two = format!(r#"{{"resources":[{0},{0}]}}"#, &TEMPLATE[14..TEMPLATE.len() - 2]);
        assert!(render(&two, "{}").is_err());
    }

    #[test]
    fn replace_renames_and_skips_what_is_already_there() {
        let dir = std::env::temp_dir().join(format!("keyward-sync-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let out = dir.join("keyward-filter.json");
        assert_eq!(replace(&out, "a"), Ok(true));
        assert_eq!(replace(&out, "a"), Ok(false));
        assert_eq!(replace(&out, "b"), Ok(true));
        assert_eq!(std::fs::read_to_string(&out).unwrap_or_default(), "b");
        let left: Vec<_> = std::fs::read_dir(&dir).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
        assert_eq!(left.len(), 1, "no temporary file is left: {left:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
