//! Command-line plumbing shared by every command: the flag parser and how a command fails.
//!
//! Exit codes (documented in `keyward help`):
//! - 0: done, or the check passed;
//! - 1: the check failed or the operation was refused (an invalid credential, a configuration
//!   with errors, an Envoy bootstrap with problems, an entry that is not in the list);
//! - 2: usage error (an unknown command or flag, a missing or malformed value);
//! - 3: the command could not run to the end (a file that cannot be read, a store that cannot
//!   be reached or that answers with an error).

use std::fmt;

/// How a command failed; each kind has its own exit code.
#[derive(Debug, PartialEq, Eq)]
pub enum Fail {
    Failed(String),
    Usage(String),
    Unavailable(String),
}

impl Fail {
    pub fn usage(m: impl Into<String>) -> Fail {
        Fail::Usage(m.into())
    }
    pub fn unavailable(m: impl Into<String>) -> Fail {
        Fail::Unavailable(m.into())
    }
    pub fn exit_code(&self) -> u8 {
        match self {
            Fail::Failed(_) => 1,
            Fail::Usage(_) => 2,
            Fail::Unavailable(_) => 3,
        }
    }
    /// The machine-readable kind, as `--json` prints it.
    pub fn kind(&self) -> &'static str {
        match self {
            Fail::Failed(_) => "failed",
            Fail::Usage(_) => "usage",
            Fail::Unavailable(_) => "unavailable",
        }
    }
    /// The same failure with its message already reported (as JSON on stdout): only the exit
    /// code remains to be given.
    pub fn quiet(self) -> Fail {
        match self {
            Fail::Failed(_) => Fail::Failed(String::new()),
            Fail::Usage(_) => Fail::Usage(String::new()),
            Fail::Unavailable(_) => Fail::Unavailable(String::new()),
        }
    }
    pub fn message(&self) -> &str {
        match self {
            Fail::Failed(m) | Fail::Usage(m) | Fail::Unavailable(m) => m,
        }
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl From<String> for Fail {
    fn from(m: String) -> Fail {
        Fail::Failed(m)
    }
}

impl From<&str> for Fail {
    fn from(m: &str) -> Fail {
        Fail::Failed(m.to_string())
    }
}

/// Parsed flags: `--name value` and `--name=value` pairs (repeatable), boolean flags, positionals.
/// A lone `--` ends the flags: what follows is positional (a token that starts with `--`).
pub struct Args {
    pairs: Vec<(String, String)>,
    flags: Vec<String>,
    pub positional: Vec<String>,
}

impl Args {
    /// `booleans` take no value; every other `--name` takes one. `--json` is a boolean on every
    /// command.
    pub fn parse(args: &[String], booleans: &[&str]) -> Result<Args, Fail> {
        let mut a = Args { pairs: vec![], flags: vec![], positional: vec![] };
        let mut it = args.iter();
        while let Some(s) = it.next() {
            if s == "--" {
                a.positional.extend(it.by_ref().cloned());
                break;
            }
            let Some(body) = s.strip_prefix("--") else {
                a.positional.push(s.clone());
                continue;
            };
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            if name.is_empty() {
                return Err(Fail::usage(format!("{s:?} is not a flag")));
            }
            if booleans.contains(&name) || name == "json" {
                if inline.is_some() {
                    return Err(Fail::usage(format!("--{name} takes no value")));
                }
                a.flags.push(name.to_string());
            } else {
                let v = match inline {
                    Some(v) => v.to_string(),
                    None => it.next().cloned().ok_or_else(|| Fail::usage(format!("--{name} needs a value")))?,
                };
                a.pairs.push((name.to_string(), v));
            }
        }
        Ok(a)
    }
    pub fn get(&self, k: &str) -> Option<&str> {
        self.pairs.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }
    pub fn all(&self, k: &str) -> Vec<&str> {
        self.pairs.iter().filter(|(n, _)| n == k).map(|(_, v)| v.as_str()).collect()
    }
    pub fn flag(&self, k: &str) -> bool {
        self.flags.iter().any(|f| f == k)
    }
    pub fn json(&self) -> bool {
        self.flag("json")
    }
    /// Every `--name value` must be one of `allowed`.
    pub fn check(&self, allowed: &[&str]) -> Result<(), Fail> {
        match self.pairs.iter().find(|(n, _)| !allowed.contains(&n.as_str())) {
            Some((n, _)) => Err(Fail::usage(format!("unknown option --{n}"))),
            None => Ok(()),
        }
    }
    /// At most `n` positionals.
    pub fn at_most(&self, n: usize) -> Result<(), Fail> {
        match self.positional.get(n) {
            Some(extra) => Err(Fail::usage(format!("unexpected argument {extra:?}"))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &[&str]) -> Result<Args, Fail> {
        let v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        Args::parse(&v, &["prune"])
    }

    #[test]
    fn both_value_forms_and_booleans() {
        let a = parse(&["--sub=lambda/x", "--allow", "stripe GET /v1/*", "--allow=a=b", "--prune", "--json", "pos"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.get("sub"), Some("lambda/x"));
        assert_eq!(a.all("allow"), vec!["stripe GET /v1/*", "a=b"]);
        assert!(a.flag("prune") && a.json());
        assert_eq!(a.positional, vec!["pos"]);
        assert_eq!(parse(&["--sub="]).map(|a| a.get("sub").map(str::to_string)), Ok(Some(String::new())));
    }

    #[test]
    fn usage_errors() {
        assert!(matches!(parse(&["--sub"]), Err(Fail::Usage(m)) if m == "--sub needs a value"));
        assert!(matches!(parse(&["--json=yes"]), Err(Fail::Usage(_))));
        assert!(matches!(parse(&["--=x"]), Err(Fail::Usage(_))));
        let a = parse(&["--nope", "1"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.check(&["sub"]), Err(Fail::usage("unknown option --nope")));
        assert_eq!(parse(&["a", "b"]).and_then(|a| a.at_most(1)), Err(Fail::usage("unexpected argument \"b\"")));
    }

    #[test]
    fn double_dash_ends_flags() {
        let a = parse(&["--", "--not-a-flag"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.positional, vec!["--not-a-flag"]);
    }

    #[test]
    fn exit_codes_differ() {
        assert_eq!([Fail::from("x").exit_code(), Fail::usage("x").exit_code(), Fail::unavailable("x").exit_code()], [1, 2, 3]);
    }
}
