//! The local-mesh harness.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
