//! Wire compatibility with the reference `rpc.proto`: every field of every message is encoded
//! with prost and compared with a protobuf encoding computed by hand (key byte =
//! `field_number << 3 | wire_type`, wire type 0 for varints, 2 for strings and messages), and
//! the compiled descriptor is checked against the reference's field table.

use prost::Message;
use vpc_cni_rpc::proto::*;

/// Encodes the default message of type `M` after `set` has filled one or more fields.
fn enc<M: Message + Default>(set: impl FnOnce(&mut M)) -> Vec<u8> {
    let mut m = M::default();
    set(&mut m);
    m.encode_to_vec()
}

#[test]
fn add_network_request_fields_have_the_reference_numbers() {
    type R = AddNetworkRequest;
    // ClientVersion = 8, string: key 8<<3|2 = 0x42, length 2, "v1".
    assert_eq!(
        enc::<R>(|r| r.client_version = "v1".into()),
        [0x42, 2, b'v', b'1']
    );
    assert_eq!(enc::<R>(|r| r.k8s_pod_name = "p".into()), [0x0a, 1, b'p']); // 1
    assert_eq!(
        enc::<R>(|r| r.k8s_pod_namespace = "n".into()),
        [0x12, 1, b'n']
    ); // 2
    assert_eq!(
        enc::<R>(|r| r.k8s_pod_infra_container_id = "i".into()),
        [0x1a, 1, b'i']
    ); // 3
    assert_eq!(enc::<R>(|r| r.netns = "/x".into()), [0x22, 2, b'/', b'x']); // 4
    assert_eq!(enc::<R>(|r| r.if_name = "e".into()), [0x2a, 1, b'e']); // 5
    assert_eq!(enc::<R>(|r| r.network_name = "a".into()), [0x32, 1, b'a']); // 6
    assert_eq!(enc::<R>(|r| r.container_id = "c".into()), [0x3a, 1, b'c']); // 7
                                                                            // RequiresMultiNICAttachment = 9, bool: key 9<<3|0 = 0x48, varint 1.
    assert_eq!(
        enc::<R>(|r| r.requires_multi_nic_attachment = true),
        [0x48, 1]
    );
}

#[test]
fn ip_allocation_metadata_fields_have_the_reference_numbers() {
    type M = IpAllocationMetadata;
    assert_eq!(enc::<M>(|m| m.i_pv4_addr = "1".into()), [0x0a, 1, b'1']); // 1
    assert_eq!(enc::<M>(|m| m.i_pv6_addr = ":".into()), [0x12, 1, b':']); // 2
                                                                          // DeviceNumber = 3, int32 (not sint32): key 0x18; 2 is the varint 0x02.
    assert_eq!(enc::<M>(|m| m.device_number = 2), [0x18, 2]);
    // An int32 of -1 (branch ENIs) is sign-extended to a 10-byte varint.
    assert_eq!(
        enc::<M>(|m| m.device_number = -1),
        [0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]
    );
    // RouteTableId = 4: key 0x20; 254 is the varint 0xfe 0x01.
    assert_eq!(enc::<M>(|m| m.route_table_id = 254), [0x20, 0xfe, 0x01]);
}

#[test]
fn add_network_reply_fields_have_the_reference_numbers() {
    type R = AddNetworkReply;
    assert_eq!(enc::<R>(|r| r.success = true), [0x08, 1]); // 1
    let ip = IpAllocationMetadata {
        i_pv4_addr: "1".into(),
        ..Default::default()
    };
    // IPAllocationMetadata = 2, embedded message: key 0x12, length 3, then [0x0a, 1, '1'].
    assert_eq!(
        enc::<R>(|r| r.ip_allocation_metadata = vec![ip]),
        [0x12, 3, 0x0a, 1, b'1']
    );
    assert_eq!(enc::<R>(|r| r.use_external_snat = true), [0x28, 1]); // 5
    assert_eq!(
        enc::<R>(|r| r.vp_cv4_cid_rs = vec!["a".into(), "b".into()]),
        [0x32, 1, b'a', 0x32, 1, b'b'] // 6, repeated: one key per element
    );
    assert_eq!(
        enc::<R>(|r| r.vp_cv6_cid_rs = vec!["c".into()]),
        [0x62, 1, b'c']
    ); // 12
    assert_eq!(enc::<R>(|r| r.pod_vlan_id = 3), [0x38, 3]); // 7
    assert_eq!(enc::<R>(|r| r.pod_enimac = "m".into()), [0x42, 1, b'm']); // 8
    assert_eq!(
        enc::<R>(|r| r.pod_eni_subnet_gw = "g".into()),
        [0x4a, 1, b'g']
    ); // 9
    assert_eq!(enc::<R>(|r| r.parent_if_index = 4), [0x50, 4]); // 10
    assert_eq!(
        enc::<R>(|r| r.network_policy_mode = "s".into()),
        [0x6a, 1, b's']
    ); // 13
}

#[test]
fn del_network_request_fields_have_the_reference_numbers() {
    type R = DelNetworkRequest;
    assert_eq!(enc::<R>(|r| r.client_version = "v".into()), [0x4a, 1, b'v']); // 9
    assert_eq!(enc::<R>(|r| r.k8s_pod_name = "p".into()), [0x0a, 1, b'p']); // 1
    assert_eq!(
        enc::<R>(|r| r.k8s_pod_namespace = "n".into()),
        [0x12, 1, b'n']
    ); // 2
    assert_eq!(
        enc::<R>(|r| r.k8s_pod_infra_container_id = "i".into()),
        [0x1a, 1, b'i']
    ); // 3
    assert_eq!(enc::<R>(|r| r.reason = "r".into()), [0x2a, 1, b'r']); // 5
    assert_eq!(enc::<R>(|r| r.if_name = "e".into()), [0x32, 1, b'e']); // 6
    assert_eq!(enc::<R>(|r| r.network_name = "a".into()), [0x3a, 1, b'a']); // 7
    assert_eq!(enc::<R>(|r| r.container_id = "c".into()), [0x42, 1, b'c']); // 8
    assert_eq!(enc::<R>(|r| r.k8s_pod_uid = "u".into()), [0x52, 1, b'u']); // 10
}

#[test]
fn del_network_reply_fields_have_the_reference_numbers() {
    type R = DelNetworkReply;
    assert_eq!(enc::<R>(|r| r.success = true), [0x08, 1]); // 1
    let ip = IpAllocationMetadata {
        route_table_id: 2,
        ..Default::default()
    };
    assert_eq!(
        enc::<R>(|r| r.ip_allocation_metadata = vec![ip]),
        [0x12, 2, 0x20, 2] // 2 { RouteTableId = 4 }
    );
    assert_eq!(enc::<R>(|r| r.pod_vlan_id = 9), [0x20, 9]); // 4
    assert_eq!(
        enc::<R>(|r| r.network_policy_mode = "s".into()),
        [0x32, 1, b's']
    ); // 6
}

#[test]
fn network_policy_messages_have_the_reference_numbers() {
    assert_eq!(
        enc::<EnforceNpRequest>(|r| r.k8s_pod_name = "p".into()),
        [0x0a, 1, b'p']
    );
    assert_eq!(
        enc::<EnforceNpRequest>(|r| r.k8s_pod_namespace = "n".into()),
        [0x12, 1, b'n']
    );
    assert_eq!(
        enc::<EnforceNpRequest>(|r| r.network_policy_mode = "s".into()),
        [0x1a, 1, b's']
    );
    assert_eq!(
        enc::<EnforceNpRequest>(|r| r.interface_count = 2),
        [0x20, 2]
    );
    assert_eq!(enc::<EnforceNpReply>(|r| r.success = true), [0x08, 1]);
    assert_eq!(
        enc::<DeleteNpRequest>(|r| r.k8s_pod_name = "p".into()),
        [0x0a, 1, b'p']
    );
    assert_eq!(
        enc::<DeleteNpRequest>(|r| r.k8s_pod_namespace = "n".into()),
        [0x12, 1, b'n']
    );
    assert_eq!(enc::<DeleteNpReply>(|r| r.success = true), [0x08, 1]);

    type C = NetworkPolicyAgentConfigReply;
    assert_eq!(
        enc::<C>(|r| r.network_policy_mode = "s".into()),
        [0x0a, 1, b's']
    ); // 1
    assert_eq!(enc::<C>(|r| r.multi_nic_enabled = true), [0x10, 1]); // 2
    assert_eq!(enc::<C>(|r| r.node_i_pv4 = "4".into()), [0x1a, 1, b'4']); // 3
    assert_eq!(enc::<C>(|r| r.node_i_pv6 = "6".into()), [0x22, 1, b'6']); // 4
    assert_eq!(enc::<C>(|r| r.instance_id = "i".into()), [0x2a, 1, b'i']); // 5
    assert_eq!(enc::<C>(|r| r.region = "r".into()), [0x32, 1, b'r']); // 6
}

#[test]
fn default_values_are_not_sent_as_proto3_requires() {
    assert!(AddNetworkRequest::default().encode_to_vec().is_empty());
    assert!(AddNetworkReply::default().encode_to_vec().is_empty());
    assert!(DelNetworkReply::default().encode_to_vec().is_empty());
}

#[test]
fn a_request_written_field_by_field_in_any_order_decodes() {
    // What a reference client might send: fields in declaration order (8 first), not by number.
    let bytes: Vec<u8> = [
        &[0x42, 2, b'v', b'1'][..],                           // ClientVersion
        &[0x0a, 3, b'p', b'o', b'd'],                         // K8S_POD_NAME
        &[0x12, 7, b'd', b'e', b'f', b'a', b'u', b'l', b't'], // K8S_POD_NAMESPACE
        &[0x3a, 2, b'c', b'1'],                               // ContainerID
        &[0x2a, 4, b'e', b't', b'h', b'0'],                   // IfName
        &[0x32, 3, b'a', b'w', b's'],                         // NetworkName
        &[0x48, 1],                                           // RequiresMultiNICAttachment
    ]
    .concat();
    let r = AddNetworkRequest::decode(bytes.as_slice()).expect("valid protobuf");
    assert_eq!(
        r,
        AddNetworkRequest {
            client_version: "v1".into(),
            k8s_pod_name: "pod".into(),
            k8s_pod_namespace: "default".into(),
            container_id: "c1".into(),
            if_name: "eth0".into(),
            network_name: "aws".into(),
            requires_multi_nic_attachment: true,
            ..Default::default()
        }
    );
}

#[test]
fn a_reply_with_a_branch_eni_round_trips() {
    let reply = AddNetworkReply {
        success: true,
        ip_allocation_metadata: vec![IpAllocationMetadata {
            i_pv4_addr: "10.0.1.7".into(),
            device_number: -1,
            ..Default::default()
        }],
        pod_vlan_id: 12,
        pod_enimac: "0a:1b:2c:3d:4e:5f".into(),
        pod_eni_subnet_gw: "10.0.1.1".into(),
        parent_if_index: 3,
        network_policy_mode: "standard".into(),
        ..Default::default()
    };
    let back = AddNetworkReply::decode(reply.encode_to_vec().as_slice()).expect("round trip");
    assert_eq!(back, reply);
}

/// A field as (name, number, type).
type Field = (&'static str, i32, &'static str);

/// (message name, fields in declaration order) as in the reference `rpc.proto`.
fn reference_fields() -> Vec<(&'static str, Vec<Field>)> {
    const S: &str = "string";
    const B: &str = "bool";
    const I: &str = "int32";
    const IP: &str = ".rpc.IPAllocationMetadata";
    vec![
        (
            "AddNetworkRequest",
            vec![
                ("ClientVersion", 8, S),
                ("K8S_POD_NAME", 1, S),
                ("K8S_POD_NAMESPACE", 2, S),
                ("K8S_POD_INFRA_CONTAINER_ID", 3, S),
                ("ContainerID", 7, S),
                ("IfName", 5, S),
                ("NetworkName", 6, S),
                ("Netns", 4, S),
                ("RequiresMultiNICAttachment", 9, B),
            ],
        ),
        (
            "IPAllocationMetadata",
            vec![
                ("IPv4Addr", 1, S),
                ("IPv6Addr", 2, S),
                ("DeviceNumber", 3, I),
                ("RouteTableId", 4, I),
            ],
        ),
        (
            "AddNetworkReply",
            vec![
                ("Success", 1, B),
                ("IPAllocationMetadata", 2, IP),
                ("UseExternalSNAT", 5, B),
                ("VPCv4CIDRs", 6, S),
                ("VPCv6CIDRs", 12, S),
                ("PodVlanId", 7, I),
                ("PodENIMAC", 8, S),
                ("PodENISubnetGW", 9, S),
                ("ParentIfIndex", 10, I),
                ("NetworkPolicyMode", 13, S),
            ],
        ),
        (
            "DelNetworkRequest",
            vec![
                ("ClientVersion", 9, S),
                ("K8S_POD_NAME", 1, S),
                ("K8S_POD_NAMESPACE", 2, S),
                ("K8S_POD_INFRA_CONTAINER_ID", 3, S),
                ("Reason", 5, S),
                ("ContainerID", 8, S),
                ("IfName", 6, S),
                ("NetworkName", 7, S),
                ("K8S_POD_UID", 10, S),
            ],
        ),
        (
            "DelNetworkReply",
            vec![
                ("Success", 1, B),
                ("IPAllocationMetadata", 2, IP),
                ("PodVlanId", 4, I),
                ("NetworkPolicyMode", 6, S),
            ],
        ),
        (
            "EnforceNpRequest",
            vec![
                ("K8S_POD_NAME", 1, S),
                ("K8S_POD_NAMESPACE", 2, S),
                ("NETWORK_POLICY_MODE", 3, S),
                ("InterfaceCount", 4, I),
            ],
        ),
        ("EnforceNpReply", vec![("Success", 1, B)]),
        (
            "DeleteNpRequest",
            vec![("K8S_POD_NAME", 1, S), ("K8S_POD_NAMESPACE", 2, S)],
        ),
        ("DeleteNpReply", vec![("Success", 1, B)]),
        (
            "NetworkPolicyAgentConfigReply",
            vec![
                ("NetworkPolicyMode", 1, S),
                ("MultiNICEnabled", 2, B),
                ("NodeIPv4", 3, S),
                ("NodeIPv6", 4, S),
                ("InstanceID", 5, S),
                ("Region", 6, S),
            ],
        ),
    ]
}

fn type_name(f: &prost_types::FieldDescriptorProto) -> String {
    use prost_types::field_descriptor_proto::Type;
    match f.r#type() {
        Type::String => "string".into(),
        Type::Bool => "bool".into(),
        Type::Int32 => "int32".into(),
        Type::Message => f.type_name().to_owned(),
        other => format!("{other:?}"),
    }
}

#[test]
fn the_compiled_descriptor_matches_the_reference_field_table() {
    use prost_types::field_descriptor_proto::Label;
    let set = prost_types::FileDescriptorSet::decode(vpc_cni_rpc::FILE_DESCRIPTOR_SET)
        .expect("descriptor set decodes");
    let file = set
        .file
        .iter()
        .find(|f| f.name() == "rpc.proto")
        .expect("rpc.proto is in the set");
    assert_eq!(file.package(), "rpc");
    assert_eq!(file.syntax(), "proto3");
    assert!(set
        .file
        .iter()
        .any(|f| f.name() == "google/protobuf/empty.proto"));

    let expected = reference_fields();
    let mut got_names: Vec<&str> = file.message_type.iter().map(|m| m.name()).collect();
    let mut want_names: Vec<&str> = expected.iter().map(|(n, _)| *n).collect();
    want_names.sort_unstable();
    got_names.sort_unstable();
    assert_eq!(got_names, want_names, "message set");

    for (message, fields) in expected {
        let m = file
            .message_type
            .iter()
            .find(|m| m.name() == message)
            .expect("message present");
        let got: Vec<(String, i32, String)> = m
            .field
            .iter()
            .map(|f| (f.name().to_owned(), f.number(), type_name(f)))
            .collect();
        let want: Vec<(String, i32, String)> = fields
            .iter()
            .map(|(n, num, t)| ((*n).to_owned(), *num, (*t).to_owned()))
            .collect();
        assert_eq!(got, want, "fields of {message}");
        for f in &m.field {
            let repeated = f.label() == Label::Repeated;
            let want_repeated = matches!(
                (message, f.name()),
                (_, "IPAllocationMetadata") | (_, "VPCv4CIDRs") | (_, "VPCv6CIDRs")
            );
            assert_eq!(repeated, want_repeated, "{message}.{} repetition", f.name());
        }
    }
}

#[test]
fn the_compiled_descriptor_has_the_reference_services() {
    let set = prost_types::FileDescriptorSet::decode(vpc_cni_rpc::FILE_DESCRIPTOR_SET)
        .expect("descriptor set decodes");
    let file = set
        .file
        .iter()
        .find(|f| f.name() == "rpc.proto")
        .expect("rpc.proto is in the set");
    type Method = (String, String, String);
    let services: Vec<(String, Vec<Method>)> = file
        .service
        .iter()
        .map(|s| {
            let methods = s
                .method
                .iter()
                .map(|m| {
                    (
                        m.name().to_owned(),
                        m.input_type().to_owned(),
                        m.output_type().to_owned(),
                    )
                })
                .collect();
            (s.name().to_owned(), methods)
        })
        .collect();
    let m = |n: &str, i: &str, o: &str| (n.to_owned(), i.to_owned(), o.to_owned());
    assert_eq!(
        services,
        vec![
            (
                "CNIBackend".to_owned(),
                vec![
                    m(
                        "AddNetwork",
                        ".rpc.AddNetworkRequest",
                        ".rpc.AddNetworkReply"
                    ),
                    m(
                        "DelNetwork",
                        ".rpc.DelNetworkRequest",
                        ".rpc.DelNetworkReply"
                    ),
                ]
            ),
            (
                "NPBackend".to_owned(),
                vec![
                    m(
                        "EnforceNpToPod",
                        ".rpc.EnforceNpRequest",
                        ".rpc.EnforceNpReply"
                    ),
                    m("DeletePodNp", ".rpc.DeleteNpRequest", ".rpc.DeleteNpReply"),
                ]
            ),
            (
                "ConfigServerBackend".to_owned(),
                vec![m(
                    "GetNetworkPolicyConfigs",
                    ".google.protobuf.Empty",
                    ".rpc.NetworkPolicyAgentConfigReply"
                )]
            ),
        ]
    );
}
