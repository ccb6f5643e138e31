//! What every command line of `cargo xtask` shares: each subcommand's
//! `parse` (with [`lexopt`]) turns its arguments into options or asks for
//! its help text; errors name the command and point at its `--help`.

use std::ffi::OsString;
use std::fmt::Display;

/// What a command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<T> {
    /// Print this help text and stop (exit status 0).
    Help(&'static str),
    /// Run with these options.
    Run(T),
}

/// A parser over a subcommand's arguments (without the program or command
/// name).
pub fn parser<I>(args: I) -> lexopt::Parser
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    lexopt::Parser::from_args(args)
}

/// `CMD: WHAT (see `cargo xtask CMD --help`)`.
pub fn error(cmd: &str, what: impl Display) -> String {
    if cmd.is_empty() {
        format!("{what} (see `cargo xtask --help`)")
    } else {
        format!("{cmd}: {what} (see `cargo xtask {cmd} --help`)")
    }
}

/// An option's value as UTF-8 text.
pub fn string(cmd: &str, v: Result<OsString, lexopt::Error>) -> Result<String, String> {
    use lexopt::ValueExt;
    v.and_then(|v| v.string()).map_err(|e| error(cmd, e))
}

/// Arguments given as string literals, for tests.
#[cfg(test)]
pub fn args(a: &[&str]) -> Vec<OsString> {
    a.iter().map(OsString::from).collect()
}

/// The error of a parse that must fail, for tests.
#[cfg(test)]
pub fn err<T: std::fmt::Debug>(r: Result<Parsed<T>, String>) -> String {
    match r {
        Err(e) => e,
        Ok(p) => panic!("parsed: {p:?}"),
    }
}

/// The options of a parse that must succeed, for tests.
#[cfg(test)]
pub fn ok<T: std::fmt::Debug>(r: Result<Parsed<T>, String>) -> T {
    match r {
        Ok(Parsed::Run(t)) => t,
        other => panic!("not options: {other:?}"),
    }
}
