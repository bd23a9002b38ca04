//! Small helpers the command lines (`tether-agent`, and the tools' `tether`) share: printing
//! that tolerates a closed pipe, reading stdin, a runtime for one command.

use std::io::{Read, Write};

use anyhow::Context;

/// Prints a line to stdout; a closed pipe (`| head`) is not an error worth a panic.
pub fn print_stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

/// All of stdin.
pub fn read_stdin() -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .context("cannot read stdin")?;
    Ok(bytes)
}

/// A single-threaded runtime for a command that does a little IO.
pub fn current_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}
