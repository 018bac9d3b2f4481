//! (tests for health land here)
