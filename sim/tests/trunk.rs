//! Security groups for pods on the simulator, through the real `aws-sdk-ec2` client over HTTP:
//! trunk ENIs, branch ENIs with their own security groups, trunk associations with VLAN ids,
//! the per-instance-type branch limit, and every error path.
#![allow(clippy::unwrap_used)]

mod common;

use aws_sdk_ec2::types::{
    Filter, NetworkInterfaceCreationType, NetworkInterfaceStatus, NetworkInterfaceType,
    ResourceType, Tag, TagSpecification,
};
use common::{client, code, fixture, Fixture};
use subnet_calc::limits::LimitOverrides;
use vpc_sim::hooks::{HookEvent, Recorder};
use vpc_sim::sim::SimConfig;

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

async fn sg(c: &aws_sdk_ec2::Client, vpc: &str, name: &str) -> String {
    c.create_security_group()
        .group_name(name)
        .description(name)
        .vpc_id(vpc)
        .send()
        .await
        .unwrap()
        .group_id()
        .unwrap()
        .to_owned()
}

/// A trunk ENI created and attached at device index 1 of the fixture's instance.
async fn trunk(c: &aws_sdk_ec2::Client, f: &Fixture) -> String {
    let t = c
        .create_network_interface()
        .subnet_id(&f.subnet)
        .description("trunk")
        .groups(&f.sg)
        .interface_type(NetworkInterfaceCreationType::Trunk)
        .send()
        .await
        .unwrap();
    let id = t
        .network_interface()
        .unwrap()
        .network_interface_id()
        .unwrap()
        .to_owned();
    c.attach_network_interface()
        .network_interface_id(&id)
        .instance_id(&f.instance)
        .device_index(1)
        .send()
        .await
        .unwrap();
    id
}

async fn branch(c: &aws_sdk_ec2::Client, f: &Fixture, groups: &[&str]) -> (String, String) {
    let mut req = c
        .create_network_interface()
        .subnet_id(&f.subnet)
        .description("aws-k8s-branch-eni")
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::NetworkInterface)
                .tags(
                    Tag::builder()
                        .key("vpcresources.k8s.aws/trunk-eni-id")
                        .value("x")
                        .build(),
                )
                .build(),
        );
    for g in groups {
        req = req.groups(*g);
    }
    let e = req.send().await.unwrap();
    let e = e.network_interface().unwrap();
    (
        e.network_interface_id().unwrap().to_owned(),
        e.private_ip_address().unwrap().to_owned(),
    )
}

async fn associate(
    c: &aws_sdk_ec2::Client,
    branch: &str,
    trunk: &str,
    vlan: i32,
) -> Result<String, String> {
    c.associate_trunk_interface()
        .branch_interface_id(branch)
        .trunk_interface_id(trunk)
        .vlan_id(vlan)
        .send()
        .await
        .map(|o| {
            o.interface_association()
                .and_then(|a| a.association_id())
                .unwrap()
                .to_owned()
        })
        .map_err(|e| code(&e))
}

async fn eni(c: &aws_sdk_ec2::Client, id: &str) -> aws_sdk_ec2::types::NetworkInterface {
    c.describe_network_interfaces()
        .network_interface_ids(id)
        .send()
        .await
        .unwrap()
        .network_interfaces()[0]
        .clone()
}

async fn free_ips(c: &aws_sdk_ec2::Client, subnet: &str) -> i32 {
    c.describe_subnets()
        .subnet_ids(subnet)
        .send()
        .await
        .unwrap()
        .subnets()[0]
        .available_ip_address_count()
        .unwrap()
}

#[tokio::test]
async fn trunk_branches_vlans_and_security_groups_through_the_sdk() {
    let rec = Recorder::new();
    let (shared, srv) = common::serve(SimConfig {
        seed: 11,
        ..Default::default()
    })
    .await;
    shared.with(|s| s.set_hooks(Box::new(rec.clone())));
    let c = client(&srv.ec2_url());
    // m5.large: 3 ENIs, 10 IPv4 per ENI, trunking compatible with 9 branches.
    let f = fixture(&c, "10.0.0.0/24", "m5.large").await;
    let free0 = free_ips(&c, &f.subnet).await;

    let t = trunk(&c, &f).await;
    let te = eni(&c, &t).await;
    assert_eq!(te.interface_type(), Some(&NetworkInterfaceType::Trunk));
    assert_eq!(te.status(), Some(&NetworkInterfaceStatus::InUse));
    let by_type = c
        .describe_network_interfaces()
        .filters(filter("interface-type", "trunk"))
        .send()
        .await
        .unwrap();
    assert_eq!(by_type.network_interfaces().len(), 1);
    assert_eq!(
        free_ips(&c, &f.subnet).await,
        free0 - 1,
        "trunk takes one address"
    );

    // Two branches with their own groups.
    let db = sg(&c, &f.vpc, "db").await;
    let web = sg(&c, &f.vpc, "web").await;
    let (b1, ip1) = branch(&c, &f, &[&db]).await;
    let (b2, _) = branch(&c, &f, &[&web, &db]).await;
    let a1 = c
        .associate_trunk_interface()
        .branch_interface_id(&b1)
        .trunk_interface_id(&t)
        .vlan_id(1)
        .client_token("assoc-1")
        .send()
        .await
        .unwrap();
    assert_eq!(a1.client_token(), Some("assoc-1"));
    let ia = a1.interface_association().unwrap();
    let a1_id = ia.association_id().unwrap().to_owned();
    assert!(a1_id.starts_with("trunk-assoc-"), "{a1_id}");
    assert_eq!(ia.branch_interface_id(), Some(b1.as_str()));
    assert_eq!(ia.trunk_interface_id(), Some(t.as_str()));
    assert_eq!(ia.vlan_id(), Some(1));
    assert_eq!(ia.interface_protocol().map(|p| p.as_str()), Some("VLAN"));
    // Same client token: the same association, no second one.
    let again = c
        .associate_trunk_interface()
        .branch_interface_id(&b1)
        .trunk_interface_id(&t)
        .vlan_id(1)
        .client_token("assoc-1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        again.interface_association().unwrap().association_id(),
        Some(a1_id.as_str())
    );
    let a2 = associate(&c, &b2, &t, 2).await.unwrap();

    // Describe: the branch is in use, typed branch, unattached, with its groups and address.
    let be = eni(&c, &b1).await;
    assert_eq!(be.interface_type(), Some(&NetworkInterfaceType::Branch));
    assert_eq!(be.status(), Some(&NetworkInterfaceStatus::InUse));
    assert!(be.attachment().is_none());
    assert_eq!(be.private_ip_address(), Some(ip1.as_str()));
    let groups: Vec<&str> = be.groups().iter().filter_map(|g| g.group_id()).collect();
    assert_eq!(groups, vec![db.as_str()]);
    let groups2: Vec<String> = eni(&c, &b2)
        .await
        .groups()
        .iter()
        .filter_map(|g| g.group_id().map(str::to_owned))
        .collect();
    assert_eq!(groups2, vec![web.clone(), db.clone()]);
    let branches = c
        .describe_network_interfaces()
        .filters(filter("interface-type", "branch"))
        .send()
        .await
        .unwrap();
    assert_eq!(branches.network_interfaces().len(), 2);
    assert_eq!(
        free_ips(&c, &f.subnet).await,
        free0 - 3,
        "each branch takes one address"
    );

    // Security groups of a branch change with ModifyNetworkInterfaceAttribute.
    c.modify_network_interface_attribute()
        .network_interface_id(&b1)
        .groups(&web)
        .send()
        .await
        .unwrap();
    let groups: Vec<String> = eni(&c, &b1)
        .await
        .groups()
        .iter()
        .filter_map(|g| g.group_id().map(str::to_owned))
        .collect();
    assert_eq!(groups, vec![web.clone()]);

    // DescribeTrunkInterfaceAssociations: all, by id, by each filter.
    let all = c
        .describe_trunk_interface_associations()
        .send()
        .await
        .unwrap();
    assert_eq!(all.interface_associations().len(), 2);
    let by_id = c
        .describe_trunk_interface_associations()
        .association_ids(&a2)
        .send()
        .await
        .unwrap();
    assert_eq!(by_id.interface_associations().len(), 1);
    assert_eq!(
        by_id.interface_associations()[0].branch_interface_id(),
        Some(b2.as_str())
    );
    for (name, value, want) in [
        (
            "trunk-interface-association.trunk-interface-id",
            t.as_str(),
            2,
        ),
        (
            "trunk-interface-association.branch-interface-id",
            b1.as_str(),
            1,
        ),
        ("trunk-interface-association.association-id", a2.as_str(), 1),
        ("vlan-id", "2", 1),
        ("vlan-id", "3", 0),
        ("interface-protocol", "VLAN", 2),
        ("interface-protocol", "GRE", 0),
    ] {
        let r = c
            .describe_trunk_interface_associations()
            .filters(filter(name, value))
            .send()
            .await
            .unwrap();
        assert_eq!(r.interface_associations().len(), want, "{name}={value}");
    }
    let e = c
        .describe_trunk_interface_associations()
        .filters(filter("bogus", "1"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidParameterValue");
    let e = c
        .describe_trunk_interface_associations()
        .association_ids("trunk-assoc-0123456789abcdef0")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidAssociationID.NotFound");

    // Pagination: 7 associations, pages of 5.
    for vlan in 3..=7 {
        let (b, _) = branch(&c, &f, &[&db]).await;
        associate(&c, &b, &t, vlan).await.unwrap();
    }
    let p1 = c
        .describe_trunk_interface_associations()
        .max_results(5)
        .send()
        .await
        .unwrap();
    assert_eq!(p1.interface_associations().len(), 5);
    let tok = p1.next_token().unwrap().to_owned();
    let p2 = c
        .describe_trunk_interface_associations()
        .max_results(5)
        .next_token(tok)
        .send()
        .await
        .unwrap();
    assert_eq!(p2.interface_associations().len(), 2);
    assert!(p2.next_token().is_none());
    let mut seen: Vec<String> = p1
        .interface_associations()
        .iter()
        .chain(p2.interface_associations())
        .filter_map(|a| a.association_id().map(str::to_owned))
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 7);
    let e = c
        .describe_trunk_interface_associations()
        .max_results(4)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidParameterValue");

    // Branches take no ENI slot: m5.large (3 ENIs) still takes one more ordinary ENI, the
    // trunk having taken the second.
    let (plain, _) = branch(&c, &f, &[&db]).await;
    c.attach_network_interface()
        .network_interface_id(&plain)
        .instance_id(&f.instance)
        .device_index(2)
        .send()
        .await
        .unwrap();

    // An associated branch can be neither attached nor deleted.
    let e = c
        .attach_network_interface()
        .network_interface_id(&b1)
        .instance_id(&f.instance)
        .device_index(3)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidNetworkInterface.InUse");
    let e = c
        .delete_network_interface()
        .network_interface_id(&b1)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidNetworkInterface.InUse");
    // A branch already associated cannot be associated again.
    assert_eq!(
        associate(&c, &b1, &t, 100).await.unwrap_err(),
        "InvalidNetworkInterface.InUse"
    );

    // The admin view lists the trunk and the associations, invariants hold.
    let state = shared.with(|s| s.state_json());
    assert_eq!(state["summary"]["invariants"], "ok");
    assert_eq!(state["summary"]["branches_associated"], 7);
    assert_eq!(state["summary"]["trunks"][0], t.as_str());
    assert_eq!(state["trunk_associations"][&a1_id]["vlan_id"], 1);

    // Disassociate: the branch is available and an ordinary interface again; then it deletes.
    let d = c
        .disassociate_trunk_interface()
        .association_id(&a1_id)
        .client_token("dis-1")
        .send()
        .await
        .unwrap();
    assert_eq!(d.r#return(), Some(true));
    assert_eq!(d.client_token(), Some("dis-1"));
    let be = eni(&c, &b1).await;
    assert_eq!(be.status(), Some(&NetworkInterfaceStatus::Available));
    assert_eq!(be.interface_type(), Some(&NetworkInterfaceType::Interface));
    // The same client token is idempotent; a new one finds no association.
    c.disassociate_trunk_interface()
        .association_id(&a1_id)
        .client_token("dis-1")
        .send()
        .await
        .unwrap();
    let e = c
        .disassociate_trunk_interface()
        .association_id(&a1_id)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidAssociationID.NotFound");
    let e = c
        .disassociate_trunk_interface()
        .association_id("assoc-nope")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidAssociationID.Malformed");
    c.delete_network_interface()
        .network_interface_id(&b1)
        .send()
        .await
        .unwrap();
    // VLAN 1 is free again on the trunk.
    let (b8, _) = branch(&c, &f, &[&db]).await;
    associate(&c, &b8, &t, 1).await.unwrap();

    // Hooks saw every association and the one disassociation, with VLAN ids and MACs.
    let evs = rec.events();
    let assoc: Vec<u32> = evs
        .iter()
        .filter_map(|e| match e {
            HookEvent::BranchAssociated(b) => Some(b.vlan_id),
            _ => None,
        })
        .collect();
    assert_eq!(assoc, vec![1, 2, 3, 4, 5, 6, 7, 1]);
    let dis: Vec<&str> = evs
        .iter()
        .filter_map(|e| match e {
            HookEvent::BranchDisassociated(b) => Some(b.branch_eni_id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(dis, vec![b1.as_str()]);
    let first = evs
        .iter()
        .find_map(|e| match e {
            HookEvent::BranchAssociated(b) => Some(b.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(first.instance_id, f.instance);
    assert_eq!(first.trunk_eni_id, t);
    assert_eq!(first.addresses.ipv4[0].to_string(), ip1);

    // Terminating the instance ends every association: the branches are left available.
    c.terminate_instances()
        .instance_ids(&f.instance)
        .send()
        .await
        .unwrap();
    let left = c
        .describe_trunk_interface_associations()
        .send()
        .await
        .unwrap();
    assert!(left.interface_associations().is_empty());
    let avail = c
        .describe_network_interfaces()
        .filters(filter("status", "available"))
        .filters(filter("description", "aws-k8s-branch-eni"))
        .send()
        .await
        .unwrap();
    // b2, five from the pagination step, b8 (b1 deleted; `plain` was attached, not
    // delete-on-termination, so it is left available too).
    assert_eq!(avail.network_interfaces().len(), 8);
    for e in avail.network_interfaces() {
        assert_eq!(e.interface_type(), Some(&NetworkInterfaceType::Interface));
    }
    assert_eq!(
        shared.with(|s| s.state_json())["summary"]["invariants"],
        "ok"
    );
    srv.shutdown();
}

#[tokio::test]
async fn trunk_errors_are_ec2_errors_through_the_sdk() {
    let mut overrides = std::collections::BTreeMap::new();
    overrides.insert(
        "c5.large".to_owned(),
        LimitOverrides {
            branch_interfaces: Some(2),
            ..Default::default()
        },
    );
    let (shared, srv) = common::serve(SimConfig {
        seed: 12,
        limit_overrides: overrides,
        ..Default::default()
    })
    .await;
    let c = client(&srv.ec2_url());
    let f = fixture(&c, "10.0.0.0/24", "c5.large").await;
    let t = trunk(&c, &f).await;
    let (b1, _) = branch(&c, &f, &[&f.sg]).await;
    let (b2, _) = branch(&c, &f, &[&f.sg]).await;
    let (b3, _) = branch(&c, &f, &[&f.sg]).await;

    // VLAN ids: 1..4094 only, unique per trunk.
    assert_eq!(
        associate(&c, &b1, &t, 0).await.unwrap_err(),
        "InvalidParameterValue"
    );
    assert_eq!(
        associate(&c, &b1, &t, 4095).await.unwrap_err(),
        "InvalidParameterValue"
    );
    associate(&c, &b1, &t, 4094).await.unwrap();
    let e = c
        .associate_trunk_interface()
        .branch_interface_id(&b2)
        .trunk_interface_id(&t)
        .vlan_id(4094)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidParameterValue");
    assert!(
        e.as_service_error()
            .and_then(|s| aws_sdk_ec2::error::ProvideErrorMetadata::message(s))
            .is_some_and(|m| m.contains("4094") && m.contains("in use")),
        "{e:?}"
    );
    // Neither VlanId nor GreKey; both.
    let e = c
        .associate_trunk_interface()
        .branch_interface_id(&b2)
        .trunk_interface_id(&t)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "MissingParameter");
    let e = c
        .associate_trunk_interface()
        .branch_interface_id(&b2)
        .trunk_interface_id(&t)
        .vlan_id(5)
        .gre_key(5)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidParameterCombination");
    // Missing, malformed and unknown ids.
    let e = c
        .associate_trunk_interface()
        .trunk_interface_id(&t)
        .vlan_id(5)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "MissingParameter");
    assert_eq!(
        associate(&c, "eni-zz", &t, 5).await.unwrap_err(),
        "InvalidNetworkInterfaceID.Malformed"
    );
    assert_eq!(
        associate(&c, "eni-0123456789abcdef0", &t, 5)
            .await
            .unwrap_err(),
        "InvalidNetworkInterfaceID.NotFound"
    );
    // TrunkInterfaceId must be a trunk; a trunk cannot be its own branch.
    assert_eq!(
        associate(&c, &b2, &b3, 5).await.unwrap_err(),
        "InvalidParameterValue"
    );
    assert_eq!(
        associate(&c, &t, &t, 5).await.unwrap_err(),
        "InvalidParameterValue"
    );
    // The branch limit of the type (overridden to 2 for c5.large).
    associate(&c, &b2, &t, 2).await.unwrap();
    let e = c
        .associate_trunk_interface()
        .branch_interface_id(&b3)
        .trunk_interface_id(&t)
        .vlan_id(3)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidParameterValue");
    assert!(format!("{e:?}").contains("at most 2"), "{e:?}");

    // A trunk that is not attached takes no branches.
    let loose = c
        .create_network_interface()
        .subnet_id(&f.subnet)
        .interface_type(NetworkInterfaceCreationType::Trunk)
        .send()
        .await
        .unwrap()
        .network_interface()
        .unwrap()
        .network_interface_id()
        .unwrap()
        .to_owned();
    assert_eq!(
        associate(&c, &b3, &loose, 3).await.unwrap_err(),
        "IncorrectState"
    );
    // An instance takes one trunk.
    let e = c
        .attach_network_interface()
        .network_interface_id(&loose)
        .instance_id(&f.instance)
        .device_index(2)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidParameterValue");
    // A branch-typed ENI is associated, never attached.
    let typed = c
        .create_network_interface()
        .subnet_id(&f.subnet)
        .interface_type(NetworkInterfaceCreationType::Branch)
        .send()
        .await
        .unwrap()
        .network_interface()
        .unwrap()
        .network_interface_id()
        .unwrap()
        .to_owned();
    let e = c
        .attach_network_interface()
        .network_interface_id(&typed)
        .instance_id(&f.instance)
        .device_index(2)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidParameterValue");

    // Trunks only on trunking-compatible (Nitro) types: t3.medium is Nitro but not compatible,
    // m4.large is Xen.
    for itype in ["t3.medium", "m4.large"] {
        let r = c
            .run_instances()
            .image_id("ami-12c6146b")
            .instance_type(aws_sdk_ec2::types::InstanceType::from(itype))
            .min_count(1)
            .max_count(1)
            .subnet_id(&f.subnet)
            .send()
            .await
            .unwrap();
        let i = r.instances()[0].instance_id().unwrap().to_owned();
        let other = Fixture {
            instance: i,
            vpc: f.vpc.clone(),
            subnet: f.subnet.clone(),
            sg: f.sg.clone(),
        };
        let tr = c
            .create_network_interface()
            .subnet_id(&other.subnet)
            .interface_type(NetworkInterfaceCreationType::Trunk)
            .send()
            .await
            .unwrap()
            .network_interface()
            .unwrap()
            .network_interface_id()
            .unwrap()
            .to_owned();
        let e = c
            .attach_network_interface()
            .network_interface_id(&tr)
            .instance_id(&other.instance)
            .device_index(1)
            .send()
            .await
            .unwrap_err();
        assert_eq!(code(&e), "UnsupportedOperation", "{itype}");
    }

    // A branch in another availability zone.
    let far = c
        .create_subnet()
        .vpc_id(&f.vpc)
        .cidr_block("10.0.9.0/24")
        .availability_zone("us-west-2b")
        .send()
        .await
        .unwrap()
        .subnet()
        .unwrap()
        .subnet_id()
        .unwrap()
        .to_owned();
    let far_eni = c
        .create_network_interface()
        .subnet_id(&far)
        .send()
        .await
        .unwrap()
        .network_interface()
        .unwrap()
        .network_interface_id()
        .unwrap()
        .to_owned();
    assert_eq!(
        associate(&c, &far_eni, &t, 9).await.unwrap_err(),
        "InvalidParameterCombination"
    );

    // Unknown CreateNetworkInterface type.
    let e = c
        .create_network_interface()
        .subnet_id(&f.subnet)
        .interface_type(NetworkInterfaceCreationType::from("vlan"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidParameterValue");

    // Detaching the trunk ends its associations.
    let att = eni(&c, &t)
        .await
        .attachment()
        .unwrap()
        .attachment_id()
        .unwrap()
        .to_owned();
    c.detach_network_interface()
        .attachment_id(att)
        .send()
        .await
        .unwrap();
    assert!(c
        .describe_trunk_interface_associations()
        .send()
        .await
        .unwrap()
        .interface_associations()
        .is_empty());
    assert_eq!(
        eni(&c, &b1).await.status(),
        Some(&NetworkInterfaceStatus::Available)
    );
    assert_eq!(
        shared.with(|s| s.state_json())["summary"]["invariants"],
        "ok"
    );
    srv.shutdown();
}
