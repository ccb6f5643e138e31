//! `cargo xtask`: build, image, run, test, bench for Tern.

mod mtree;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("mtree") => mtree::main(&args[1..]),
        _ => Err("usage: cargo xtask <build|image|run|test|bench|mtree> [args]".to_string()),
    };
    if let Err(e) = result {
        eprintln!("xtask: {e}");
        std::process::exit(1);
    }
}
