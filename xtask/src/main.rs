//! `cargo xtask`: build, image, run, test and bench Tern.
//!
//! - `build`: the hypervisor and the test guest for `x86_64-unknown-none`.
//! - `image [--guest ARGS] [KERNEL ARGS]`: a GRUB rescue ISO (multiboot2 entry).
//! - `run [--emulator bochs|qemu] [--guest ARGS] [--guest-image FILE]
//!   [--module FILE[=STRING]] [KERNEL ARGS]`: boots Tern with the test guest
//!   (or any multiboot image, with multiboot modules) and shows its console.
//!   QEMU with KVM when `/dev/kvm` exists and the host CPU has VMX, Bochs
//!   otherwise.
//! - `run-suite DIR`: every test kernel of a directory (kvm-unit-tests'
//!   `x86/` with its `unittests.cfg`) as a Tern guest in Bochs, one line
//!   each and a summary table.
//! - `test`: host unit tests, then every bare-metal scenario under Bochs
//!   (VMX) and QEMU TCG (boot path, no-VMX report).
//! - `bench [--quick] [--json FILE] [--all]`: the seed's table from the load
//!   benchmark (modes, floor, counters), the scaling plot, hv-core's benches.
//! - `mtree --flat FILE`: Tern's flat views of an `info mtree` tree dump.
//!
//! Every command takes `-h`/`--help`. Each command's module has a `parse`
//! (lexopt) from its arguments to its options, or to its help text; an
//! unknown option is an error that names the command.

mod bench;
mod bench_bochs;
mod bench_qemu;
mod build;
mod cli;
mod deps;
mod emu;
mod migrate;
mod migrate_run;
mod mtree;
mod scenarios;
mod suite;

use cli::Parsed;
use std::ffi::OsString;
use std::path::PathBuf;

/// `cargo xtask --help`.
const USAGE: &str = "\
usage: cargo xtask COMMAND [OPTIONS]

Builds, runs, tests and benchmarks Tern.

commands:
  build       build tern (the hypervisor) and tern-guest for x86_64-unknown-none
  image       write target/tern.iso, a GRUB ISO that boots Tern with a VM
  run         boot Tern with the test guest (or any multiboot image) in QEMU+KVM
              or Bochs and show its console
  run-suite   run a directory of test kernels (kvm-unit-tests) as Tern guests
  test        the host unit tests, then every bare-metal scenario
  bench       the seed's table: load time per shape and commit mode against the
              floor, exact counters, scaling plot (--all: hv-core's benches too)
  bench-qemu  QEMU's non-iterable load time for the seed's shapes (root: taps)
  bench-bochs Tern's load and downtime for the seed's shapes in Bochs (instructions)
  mtree       QEMU `info mtree` dumps through Tern's memory API
  migrate     migrate a VM between two Terns through a file (--save, --load),
              or print a stream: `migrate inspect FILE`
  help [COMMAND]

`cargo xtask COMMAND --help` shows a command's options.
";

/// `cargo xtask build --help`.
const BUILD_USAGE: &str = "\
usage: cargo xtask build

Builds tern (the hypervisor) and tern-guest (the test guest) in release mode for
x86_64-unknown-none, adding the target to the pinned toolchain if it is missing.
Every other command builds what it needs itself.

options:
  -h, --help   this text
";

/// A whole `cargo xtask` command line.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Build,
    Image(emu::RunOptions),
    Run(emu::RunOptions),
    RunSuite(suite::SuiteOptions),
    Test(scenarios::TestOptions),
    Bench(bench::BenchOptions),
    Mtree(mtree::Mode),
    Migrate(migrate_run::MigrateOptions),
    BenchQemu(bench_qemu::Options),
    BenchBochs(bench_bochs::Options),
}

/// Parses the command line after the program name.
fn parse<I>(args: I) -> Result<Parsed<Command>, String>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    use lexopt::Arg::{Long, Short, Value};
    let mut p = cli::parser(args);
    let arg = p.next().map_err(|e| cli::error("", e))?;
    match arg {
        None => Err(format!("no command given\n\n{USAGE}")),
        Some(Short('h') | Long("help")) => Ok(Parsed::Help(USAGE)),
        Some(Value(cmd)) => {
            let cmd = cli::string("", Ok(cmd))?;
            let rest: Vec<OsString> = p.raw_args().map_err(|e| cli::error(&cmd, e))?.collect();
            if cmd == "help" {
                return match rest.as_slice() {
                    [] => Ok(Parsed::Help(USAGE)),
                    [c] => match command(&cli::string("help", Ok(c.clone()))?, ["--help"])? {
                        Parsed::Help(h) => Ok(Parsed::Help(h)),
                        Parsed::Run(_) => Err("help: no help text".into()),
                    },
                    _ => Err(cli::error("help", "one COMMAND only")),
                };
            }
            command(&cmd, rest)
        }
        Some(other) => Err(cli::error("", other.unexpected())),
    }
}

/// Parses the arguments of subcommand `cmd`.
fn command<I>(cmd: &str, args: I) -> Result<Parsed<Command>, String>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    fn map<T>(p: Parsed<T>, f: impl FnOnce(T) -> Command) -> Parsed<Command> {
        match p {
            Parsed::Help(h) => Parsed::Help(h),
            Parsed::Run(t) => Parsed::Run(f(t)),
        }
    }
    Ok(match cmd {
        "build" => map(parse_build(args)?, |()| Command::Build),
        "image" => map(emu::parse_image(args)?, Command::Image),
        "run" => map(emu::parse_run(args)?, Command::Run),
        "run-suite" => map(suite::parse(args)?, Command::RunSuite),
        "test" => map(scenarios::parse(args)?, Command::Test),
        "bench" => map(bench::parse(args)?, Command::Bench),
        "mtree" => map(mtree::parse(args)?, Command::Mtree),
        "migrate" => map(migrate_run::parse(args)?, Command::Migrate),
        "bench-qemu" => map(bench_qemu::parse(args)?, Command::BenchQemu),
        "bench-bochs" => map(bench_bochs::parse(args)?, Command::BenchBochs),
        other => {
            return Err(cli::error(
                "",
                format!(
                    "unknown command {other:?}; commands: build, image, run, run-suite, test, bench, bench-qemu, bench-bochs, mtree, migrate"
                ),
            ))
        }
    })
}

/// `cargo xtask build` takes no arguments but `--help`.
fn parse_build<I>(args: I) -> Result<Parsed<()>, String>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    use lexopt::Arg::{Long, Short};
    let mut p = cli::parser(args);
    match p.next().map_err(|e| cli::error("build", e))? {
        None => Ok(Parsed::Run(())),
        Some(Short('h') | Long("help")) => Ok(Parsed::Help(BUILD_USAGE)),
        Some(other) => Err(cli::error("build", other.unexpected())),
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.parent().map(PathBuf::from).unwrap_or(dir)
}

fn run(cmd: &Command) -> Result<(), String> {
    match cmd {
        Command::Build => build::build_all().map(|_| ()),
        Command::Image(o) => emu::image_cmd(o),
        Command::Run(o) => emu::run_cmd(o),
        Command::RunSuite(o) => suite::run_suite(o),
        Command::Test(o) => scenarios::test_cmd(o),
        Command::Bench(o) => bench::bench_cmd(o),
        Command::Mtree(m) => mtree::main(m),
        Command::Migrate(o) => migrate_run::migrate_cmd(o),
        Command::BenchQemu(o) => bench_qemu::cmd(o).map(|_| ()),
        Command::BenchBochs(o) => bench_bochs::cmd(o).map(|_| ()),
    }
}

fn main() {
    let result = parse(std::env::args_os().skip(1)).and_then(|p| match p {
        Parsed::Help(text) => {
            print!("{text}");
            Ok(())
        }
        Parsed::Run(cmd) => run(&cmd),
    });
    if let Err(e) = result {
        eprintln!("xtask: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{args, err, ok};

    #[test]
    fn top_level_help() {
        for a in [&["-h"][..], &["--help"], &["help"]] {
            assert_eq!(parse(args(a)), Ok(Parsed::Help(USAGE)));
        }
        for c in [
            "build",
            "image",
            "run",
            "run-suite",
            "test",
            "bench",
            "mtree",
            "migrate",
            "bench-qemu",
            "bench-bochs",
        ] {
            assert!(USAGE.contains(&format!("\n  {c} ")), "{c}");
        }
        // `help CMD` is `CMD --help`.
        let cmds = [
            ("build", BUILD_USAGE),
            ("image", emu::IMAGE_USAGE),
            ("run", emu::RUN_USAGE),
            ("run-suite", suite::USAGE),
            ("test", scenarios::USAGE),
            ("bench", bench::USAGE),
            ("mtree", mtree::USAGE),
            ("migrate", migrate_run::USAGE),
            ("bench-qemu", bench_qemu::USAGE),
            ("bench-bochs", bench_bochs::USAGE),
        ];
        for (c, text) in cmds {
            assert!(text.starts_with(&format!("usage: cargo xtask {c}")), "{c}");
            assert_eq!(parse(args(&[c, "--help"])), Ok(Parsed::Help(text)), "{c}");
            assert_eq!(parse(args(&[c, "-h"])), Ok(Parsed::Help(text)), "{c}");
            assert_eq!(parse(args(&["help", c])), Ok(Parsed::Help(text)), "{c}");
        }
        assert!(err(parse(args(&["help", "nope"]))).contains("unknown command \"nope\""));
        assert!(err(parse(args(&["help", "run", "test"]))).contains("one COMMAND only"));
    }

    #[test]
    fn top_level_errors() {
        assert!(err(parse(args(&[]))).starts_with("no command given\n\nusage:"));
        assert_eq!(
            err(parse(args(&["--verbose", "run"]))),
            "invalid option '--verbose' (see `cargo xtask --help`)"
        );
        assert_eq!(
            err(parse(args(&["biuld"]))),
            "unknown command \"biuld\"; commands: build, image, run, run-suite, test, bench, bench-qemu, bench-bochs, mtree, migrate (see `cargo xtask --help`)"
        );
    }

    #[test]
    fn migrate_parses() {
        let m = |a: &[&str]| match ok(parse(args(a))) {
            Command::Migrate(o) => o,
            c => panic!("not migrate: {c:?}"),
        };
        assert_eq!(
            m(&["migrate", "inspect", "s.mig"]).action,
            migrate_run::Action::Inspect("s.mig".into())
        );
        assert!(err(parse(args(&["migrate", "inspect"]))).contains("expected `inspect FILE`"));
        assert!(
            err(parse(args(&["migrate", "inspect", "a", "--save", "b"])))
                .contains("expected `inspect FILE`")
        );
        assert!(err(parse(args(&["migrate", "--x"]))).contains("invalid option"));
        let o = m(&[
            "migrate",
            "--save",
            "s.mig",
            "devices=net:1x2",
            "--",
            "-odd",
        ]);
        assert_eq!(o.action, migrate_run::Action::Save("s.mig".into()));
        assert_eq!(o.kernel, "devices=net:1x2 -odd");
        assert_eq!(
            o.guest,
            "name=mig scenario=migrate expect=net:1x2 pages=512"
        );
        let o = m(&["migrate", "--load", "s.mig", "--guest", "name=x"]);
        assert_eq!(
            (o.action, o.guest.as_str()),
            (migrate_run::Action::Load("s.mig".into()), "name=x")
        );
        assert_eq!(m(&["migrate"]).action, migrate_run::Action::Both(None));
        assert_eq!(
            m(&["migrate", "analyze", "s.mig", "--script", "a.py"]).action,
            migrate_run::Action::Analyze {
                file: "s.mig".into(),
                script: Some("a.py".into())
            }
        );
        assert!(err(parse(args(&["migrate", "--script", "a.py"]))).contains("goes with"));
        assert!(err(parse(args(&["migrate", "--save", "a", "--load", "b"])))
            .contains("one of --save, --load, --file"));
        assert!(err(parse(args(&["migrate", "--save"]))).contains("missing"));
        assert!(err(parse(args(&["migrate", "migrate=local"]))).contains("set by xtask"));
        assert!(err(parse(args(&["migrate", "--emulator", "kvm"]))).contains("bochs or qemu"));
    }

    #[test]
    fn top_level_dispatch() {
        assert_eq!(ok(parse(args(&["build"]))), Command::Build);
        assert_eq!(
            err(parse(args(&["build", "--release"]))),
            "build: invalid option '--release' (see `cargo xtask build --help`)"
        );
        assert!(err(parse(args(&["build", "x"]))).starts_with("build: unexpected argument"));
        let Command::Run(r) = ok(parse(args(&["run", "--emulator", "bochs", "ram=64"]))) else {
            panic!("not run");
        };
        assert_eq!(
            (r.emulator, r.kernel.as_str()),
            (Some(emu::EmulatorChoice::Bochs), "ram=64 mtree")
        );
        assert!(matches!(ok(parse(args(&["image"]))), Command::Image(_)));
        assert!(matches!(
            ok(parse(args(&["run-suite", "d"]))),
            Command::RunSuite(_)
        ));
        assert_eq!(
            ok(parse(args(&["test", "hello"]))),
            Command::Test(scenarios::TestOptions {
                bare_metal_only: false,
                filter: Some("hello".into())
            })
        );
        assert_eq!(
            ok(parse(args(&["mtree", "--flat", "t"]))),
            Command::Mtree(mtree::Mode::Flat("t".into()))
        );
        // Words after the command are the command's, even `--`.
        assert_eq!(
            ok(parse(args(&["run", "--", "--guest"]))),
            Command::Run(ok(emu::parse_run(args(&["--", "--guest"]))))
        );
    }

    #[test]
    fn bench_forwards_to_criterion() {
        let o = |a: &[&str]| match ok(parse(args(a))) {
            Command::Bench(o) => o,
            other => panic!("{other:?}"),
        };
        let b = o(&["bench", "load-test1", "--", "--save-baseline", "main"]);
        assert_eq!(
            b.criterion,
            args(&["load-test1", "--save-baseline", "main"])
        );
        assert_eq!(o(&["bench", "--", "--help"]).criterion, args(&["--help"]));
        assert!(o(&["bench"]).criterion.is_empty());
        assert!(err(parse(args(&["bench", "--save-baseline", "x"]))).contains("bench"));
    }
}
