//! Checks of the CNI plugin's requests before they reach the datastore: every field within the
//! bounds that the CNI spec and Kubernetes give it, so that no request can make ipamd store,
//! log or label a value it would not accept from a well-behaved plugin. A refusal is
//! `InvalidArgument` naming the field (its proto name, as the plugin's author reads it).

use tonic::Status;
use vpc_cni_rpc::{AddNetworkRequest, DelNetworkRequest};

/// Longest container id (`ContainerID`, `K8S_POD_INFRA_CONTAINER_ID`) taken; runtimes use 64
/// hexadecimal characters.
pub const MAX_CONTAINER_ID: usize = 256;
/// Longest network name taken (the CNI config's `name`).
pub const MAX_NETWORK_NAME: usize = 253;
/// Longest pod name or namespace taken (a Kubernetes DNS subdomain name).
pub const MAX_POD_NAME: usize = 253;
/// Longest interface name (IFNAMSIZ - 1).
pub const MAX_IF_NAME: usize = 15;
/// Longest network namespace path (`PATH_MAX`).
pub const MAX_NETNS: usize = 4096;
/// Longest DelNetwork reason taken.
pub const MAX_REASON: usize = 64;

fn refuse(field: &str, why: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {why}"))
}

/// At most `max` bytes and no control characters.
fn bounded(field: &str, v: &str, max: usize) -> Result<(), Status> {
    if v.len() > max {
        return Err(refuse(
            field,
            format_args!("{} bytes, more than {max}", v.len()),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(refuse(field, "has control characters"));
    }
    Ok(())
}

/// The CNI spec's container id rule: an alphanumeric character, then alphanumerics, `_`,
/// `.` or `-`.
fn container_id(field: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() {
        return Err(refuse(field, "empty"));
    }
    bounded(field, v, MAX_CONTAINER_ID)?;
    let mut chars = v.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !ok {
        return Err(refuse(
            field,
            "must be alphanumerics, '_', '.' or '-', starting with an alphanumeric",
        ));
    }
    Ok(())
}

/// libcni's interface name rule: 1..=15 bytes, not `.` or `..`, no `/`, `:` or whitespace.
fn if_name(v: &str) -> Result<(), Status> {
    const F: &str = "IfName";
    if v.is_empty() {
        return Err(refuse(F, "empty"));
    }
    bounded(F, v, MAX_IF_NAME)?;
    if v == "." || v == ".." || v.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return Err(refuse(F, "not a valid interface name"));
    }
    Ok(())
}

fn network_name(v: &str) -> Result<(), Status> {
    const F: &str = "NetworkName";
    if v.is_empty() {
        return Err(refuse(F, "empty"));
    }
    bounded(F, v, MAX_NETWORK_NAME)
}

/// Checks an AddNetwork request (the client version is checked before, by the caller).
pub fn check_add(r: &AddNetworkRequest) -> Result<(), Status> {
    container_id("ContainerID", &r.container_id)?;
    if_name(&r.if_name)?;
    network_name(&r.network_name)?;
    bounded("K8S_POD_NAME", &r.k8s_pod_name, MAX_POD_NAME)?;
    bounded("K8S_POD_NAMESPACE", &r.k8s_pod_namespace, MAX_POD_NAME)?;
    if !r.k8s_pod_infra_container_id.is_empty() {
        container_id("K8S_POD_INFRA_CONTAINER_ID", &r.k8s_pod_infra_container_id)?;
    }
    bounded("Netns", &r.netns, MAX_NETNS)?;
    Ok(())
}

/// Checks a DelNetwork request. Only sizes: a DEL must still release a key that an older
/// daemon accepted and wrote to the checkpoint, whatever its characters.
pub fn check_del(r: &DelNetworkRequest) -> Result<(), Status> {
    let size = |field: &str, v: &str, max: usize| {
        if v.len() > max {
            Err(refuse(
                field,
                format_args!("{} bytes, more than {max}", v.len()),
            ))
        } else {
            Ok(())
        }
    };
    size("ContainerID", &r.container_id, MAX_CONTAINER_ID)?;
    size("IfName", &r.if_name, MAX_CONTAINER_ID)?;
    size("NetworkName", &r.network_name, MAX_NETWORK_NAME)?;
    size("K8S_POD_NAME", &r.k8s_pod_name, MAX_POD_NAME)?;
    size("K8S_POD_NAMESPACE", &r.k8s_pod_namespace, MAX_POD_NAME)?;
    size(
        "K8S_POD_INFRA_CONTAINER_ID",
        &r.k8s_pod_infra_container_id,
        MAX_CONTAINER_ID,
    )?;
    size("K8S_POD_UID", &r.k8s_pod_uid, MAX_CONTAINER_ID)?;
    size("Reason", &r.reason, MAX_REASON)?;
    Ok(())
}

/// The DelNetwork reason as a metric label: the plugin's reasons as they are, anything else
/// `other` (a client cannot grow the metric's series without bound).
pub fn reason_label(reason: &str) -> &'static str {
    match reason {
        vpc_cni_rpc::REASON_POD_DELETED => vpc_cni_rpc::REASON_POD_DELETED,
        vpc_cni_rpc::REASON_SETUP_NS_FAILED => vpc_cni_rpc::REASON_SETUP_NS_FAILED,
        "" => "",
        _ => "other",
    }
}

/// The client version check of `vpc_cni_rpc`, its message naming the field.
pub fn check_version(got: &str, ours: &str) -> Result<(), Status> {
    vpc_cni_rpc::check_client_version(got, ours)
        .map_err(|s| Status::new(s.code(), format!("ClientVersion: {}", s.message())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_named() {
        let ok = AddNetworkRequest {
            container_id: "abc".into(),
            if_name: "eth0".into(),
            network_name: "aws-cni".into(),
            ..Default::default()
        };
        assert!(check_add(&ok).is_ok());
        for (r, field) in [
            (
                AddNetworkRequest {
                    container_id: "a/b".into(),
                    ..ok.clone()
                },
                "ContainerID",
            ),
            (
                AddNetworkRequest {
                    if_name: "eth0 x".into(),
                    ..ok.clone()
                },
                "IfName",
            ),
            (
                AddNetworkRequest {
                    network_name: String::new(),
                    ..ok.clone()
                },
                "NetworkName",
            ),
            (
                AddNetworkRequest {
                    k8s_pod_name: "x".repeat(254),
                    ..ok.clone()
                },
                "K8S_POD_NAME",
            ),
        ] {
            let e = check_add(&r).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().starts_with(field), "{}", e.message());
        }
        assert_eq!(reason_label("PodDeleted"), "PodDeleted");
        assert_eq!(reason_label("x"), "other");
        let e = check_version("1", "2").unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("ClientVersion"));
        assert!(e.message().contains("wrong client version"));
    }
}
