//! The `inferalign` command line: one file per tool under `cli/`.

mod cli;

use clap::Parser;

fn main() {
    // A closed pipe (`inferalign inspect FILE | head`) ends the program
    // quietly, as it does other Unix tools, instead of a panic in println!.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = cli::Cli::parse();
    if let Err(err) = cli::run(args) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
