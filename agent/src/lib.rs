//! nodescope's modules, as a library: the `nodescope` binary (main.rs) is
//! its command line, and the fuzz targets (agent/fuzz) call the parsers
//! here directly.

pub mod agent;
pub mod bpf;
pub mod caps;
pub mod cgroup;
pub mod chain;
pub mod chainlog;
pub mod config;
pub mod container;
pub mod discovery;
pub mod disk;
pub mod events;
pub mod health;
pub mod http;
pub mod mountinfo;
pub mod net;
pub mod netns;
pub mod otlp;
pub mod resources;
pub mod scope;
pub mod selfmetrics;
pub mod settings;
pub mod signal;
pub mod snapshot;
pub mod sockdiag;
pub mod state;
pub mod target;
pub mod telemetry;
pub mod top;
