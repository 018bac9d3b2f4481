//! (tests for resources land here)
