//! The `stampede` binary is only wiring: parse the command line, hand each command to
//! the library module that owns it, and turn its outcome into an exit code.

use clap::Parser;
use stampede::cli::{Cli, Command};
use stampede::exit::Outcome;

fn main() {
    // Before any thread exists: see `fds` for why the table is grown now.
    stampede::engine::fds::prepare();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Run(args) => stampede::commands::run(args),
        Command::Validate(args) => stampede::commands::validate(args),
        Command::Demo(args) => stampede::demo::demo(args),
        Command::Node(args) => stampede::daemon::node(args),
        Command::Peers(args) => stampede::daemon::peers(args),
        Command::Status(args) => stampede::daemon::status(args),
        Command::Stop(args) => stampede::daemon::stop(args),
        Command::Report(args) => stampede::daemon::report(args),
        Command::Keygen(args) => stampede::daemon::keygen(args),
        Command::Import(stampede::cli::ImportCommand::Har(args)) => {
            stampede::commands::import_har(args)
        }
    };
    std::process::exit(Outcome::exit_code(outcome));
}
