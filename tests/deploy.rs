//! (tests for deploy land here)
