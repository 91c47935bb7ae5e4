//! The Trellis control plane.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
