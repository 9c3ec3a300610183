//! The `hivetrain` binary.

fn main() -> std::process::ExitCode {
    cli::main()
}
