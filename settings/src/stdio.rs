//! Standard output and error for the binaries' logs and messages, where a write that fails is
//! dropped instead of reported.
//!
//! A binary whose stdout and stderr are closed or broken (the log collector went away, a pipe's
//! reader exited) must still stop on SIGTERM and never panic. `println!`/`eprintln!` panic when
//! the write fails, and tracing-subscriber's fmt layer reports its own failed writes with
//! `eprintln!`: with both streams broken, that panic killed the consumer's signal task (SIGTERM
//! was then ignored) and the collector's main thread (exit 101). Logs go through
//! [`lossy_stdout`] instead, and one-line messages through [`eprint_line`].

use std::io::{self, Write};

/// Standard output that reports every write as done: what cannot be written is lost.
#[derive(Debug, Default, Clone, Copy)]
pub struct LossyStdout;

impl Write for LossyStdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // One event is one buffer: written whole under the lock, or not at all.
        let _ = io::stdout().lock().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stdout().flush();
        Ok(())
    }
}

/// The writer of the binaries' logs (`tracing_subscriber::fmt().with_writer(lossy_stdout)`).
pub fn lossy_stdout() -> LossyStdout {
    LossyStdout
}

/// Writes `line` and a newline to standard error, ignoring a failure (where `eprintln!` panics).
pub fn eprint_line(line: &str) {
    let _ = writeln!(io::stderr().lock(), "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_write_is_reported_done() {
        let mut out = LossyStdout;
        assert_eq!(out.write(b"").ok(), Some(0));
        assert!(out.flush().is_ok());
    }
}
