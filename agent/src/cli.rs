//! Small helpers the command lines (`tether-agent`, and the tools' `tether`) share: printing
//! that tolerates a closed pipe, reading stdin, a runtime for one command.

use std::io::{Read, Write};

/// Prints a line to stdout; a closed pipe (`| head`) is not an error worth a panic.
pub fn print_stdout(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e),
        _ => Ok(()),
    }
}

/// All of stdin.
pub fn read_stdin() -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::io::stdin().read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// A single-threaded runtime for a command that does a little IO.
pub fn current_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}
