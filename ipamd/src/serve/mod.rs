//! What clients reach: the CNI plugin's gRPC services on the unix socket ([`grpc`]), the
//! introspection endpoints ([`introspect`]) and the Prometheus metrics ([`metrics`]).

pub mod grpc;
pub mod introspect;
pub mod metrics;
