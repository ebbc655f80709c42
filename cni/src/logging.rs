//! Logging: `tracing` as JSON lines to `pluginLogFile` (appended) or stderr. Never stdout,
//! which carries the CNI result.

use std::fs::OpenOptions;
use std::sync::Mutex;

use tracing::Level;

use crate::config::{LogLevel, LogTarget};

fn level(l: LogLevel) -> Level {
    match l {
        LogLevel::Trace => Level::TRACE,
        LogLevel::Debug => Level::DEBUG,
        LogLevel::Info => Level::INFO,
        LogLevel::Warn => Level::WARN,
        LogLevel::Error => Level::ERROR,
    }
}

/// Installs the global subscriber. A log file that cannot be opened falls back to stderr
/// (logging never fails a pod). Does nothing if a subscriber is already installed.
pub fn init(target: &LogTarget, l: LogLevel) {
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    use tracing_subscriber::prelude::*;
    let file = match target {
        LogTarget::Stderr => None,
        LogTarget::File(path) => {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            match OpenOptions::new().create(true).append(true).open(path) {
                Ok(f) => Some(f),
                Err(e) => {
                    eprintln!(
                        "aws-cni: cannot open log file {}: {e}; logging to stderr",
                        path.display()
                    );
                    None
                }
            }
        }
    };
    let writer = match file {
        Some(f) => BoxMakeWriter::new(Mutex::new(f)),
        None => BoxMakeWriter::new(std::io::stderr),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .json()
        .with_ansi(false)
        .with_current_span(false)
        .with_span_list(false)
        .with_writer(writer)
        .with_filter(LevelFilter::from_level(level(l)));
    // Only with AWS_CNI_TIMING=1: the pod-network steps become timing marks.
    let steps = crate::timing::enabled().then_some(crate::timing::StepLayer);
    // Only with VPC_CNI_FAILPOINTS (tests): the pod-network steps can kill the plugin.
    let kills = crate::failpoint::armed().then_some(crate::failpoint::StepLayer);
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(steps)
        .with(kills)
        .try_init();
}
