//! The Trellis gRPC contract: identity (certificate issuance), discovery
//! (snapshots pushed to sidecars), policy (the compiled policy model) and
//! admin (the operators' API). Generated from `proto/` at build time.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![allow(clippy::all)]

pub mod identity {
    pub mod v1 {
        tonic::include_proto!("trellis.identity.v1");
    }
}

pub mod discovery {
    pub mod v1 {
        tonic::include_proto!("trellis.discovery.v1");

        pub mod encoded;
    }
}

pub mod policy {
    pub mod v1 {
        tonic::include_proto!("trellis.policy.v1");
    }
}

pub mod admin {
    pub mod v1 {
        tonic::include_proto!("trellis.admin.v1");
    }
}

/// The encoded `FileDescriptorSet` of every Trellis service, for gRPC
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/trellis_descriptor.bin"));
