//! Health decisions (issue: rules, /health endpoints). Filled in by the health module work.
