//! Command-line plumbing shared by every command: its arguments (parsed by clap) and how a
//! command fails.
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

/// A command's arguments, parsed by clap: `--name value` and `--name=value` options (repeatable),
/// boolean flags, positionals. A lone `--` ends the options: what follows is positional (a token
/// that starts with `--`). `--json` is a flag of every command.
pub struct Args {
    pairs: Vec<(String, String)>,
    flags: Vec<String>,
    pub positional: Vec<String>,
}

impl Args {
    /// Parse `args` for a command whose flags are `flags`, whose valued options are `options`, and
    /// which takes at most `positionals` positional arguments. Anything else is a usage error,
    /// with clap's message.
    pub fn read(args: &[String], flags: &[&'static str], options: &[&'static str], positionals: usize) -> Result<Args, Fail> {
        use clap::{Arg, ArgAction, Command};
        let mut cmd = Command::new("keyward")
            .no_binary_name(true)
            .disable_help_flag(true)
            .disable_version_flag(true)
            .disable_help_subcommand(true)
            .arg(Arg::new("json").long("json").action(ArgAction::SetTrue).overrides_with("json"));
        for f in flags {
            cmd = cmd.arg(Arg::new(*f).long(*f).action(ArgAction::SetTrue).overrides_with(*f));
        }
        for o in options {
            cmd = cmd.arg(Arg::new(*o).long(*o).action(ArgAction::Append).num_args(1).allow_hyphen_values(true).value_name("VALUE"));
        }
        if positionals > 0 {
            let range = if positionals == usize::MAX { clap::builder::ValueRange::new(0..) } else { clap::builder::ValueRange::new(0..=positionals) };
            cmd = cmd.arg(Arg::new(" positional").num_args(range).action(ArgAction::Append).value_name("ARG"));
        }
        let m = cmd.try_get_matches_from(args).map_err(|e| {
            let text = e.render().to_string();
            let line = text.lines().next().unwrap_or("").trim_start_matches("error: ").to_string();
            Fail::Usage(line)
        })?;
        let mut a = Args { pairs: vec![], flags: vec![], positional: vec![] };
        for f in flags.iter().chain(["json"].iter()) {
            if m.get_flag(f) {
                a.flags.push(f.to_string());
            }
        }
        for o in options {
            for v in m.get_many::<String>(o).into_iter().flatten() {
                a.pairs.push((o.to_string(), v.clone()));
            }
        }
        if positionals > 0 {
            a.positional = m.get_many::<String>(" positional").into_iter().flatten().cloned().collect();
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &[&str], positionals: usize) -> Result<Args, Fail> {
        let v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        Args::read(&v, &["prune"], &["sub", "allow"], positionals)
    }

    #[test]
    fn both_value_forms_and_booleans() {
        let a = parse(&["--sub=lambda/x", "--allow", "stripe GET /v1/*", "--allow=a=b", "--prune", "--json", "pos"], 1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.get("sub"), Some("lambda/x"));
        assert_eq!(a.all("allow"), vec!["stripe GET /v1/*", "a=b"]);
        assert!(a.flag("prune") && a.json());
        assert_eq!(a.positional, vec!["pos"]);
        assert_eq!(parse(&["--sub="], 0).map(|a| a.get("sub").map(str::to_string)), Ok(Some(String::new())));
        assert_eq!(parse(&["--sub", "-"], 0).map(|a| a.get("sub").map(str::to_string)), Ok(Some("-".into())));
    }

    #[test]
    fn usage_errors_name_what_is_wrong() {
        let err = |v: &[&str], n| match parse(v, n) {
            Err(Fail::Usage(m)) => m,
            other => panic!("{v:?}: {:?}", other.map(|a| a.positional)),
        };
        assert!(err(&["--sub"], 0).contains("--sub"));
        assert!(err(&["--json=yes"], 0).contains("yes"));
        assert!(err(&["--nope", "1"], 0).contains("--nope"));
        assert!(err(&["a", "b"], 1).contains('b'));
        assert!(err(&["a"], 0).contains('a'));
    }

    #[test]
    fn double_dash_ends_flags() {
        let a = parse(&["--", "--not-a-flag"], 1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.positional, vec!["--not-a-flag"]);
    }

    #[test]
    fn exit_codes_differ() {
        assert_eq!([Fail::from("x").exit_code(), Fail::usage("x").exit_code(), Fail::unavailable("x").exit_code()], [1, 2, 3]);
    }
}
