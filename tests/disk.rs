//! (tests for disk land here)
