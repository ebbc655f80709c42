//! What clients reach: the CNI plugin's gRPC services on the unix socket ([`grpc`]), the
//! introspection endpoints ([`introspect`]) and the Prometheus metrics ([`metrics`]), with the
//! checks of the plugin's requests ([`request`]).

pub mod grpc;
pub mod introspect;
pub mod metrics;
pub mod request;
