//! The controller against the VPC simulator through the real aws-sdk-ec2 client over HTTP,
//! and against a stateful API-server stand-in through a real kube client over tower-test
//! (`common`): trunk on the node, a branch per selected pod with the policy's groups and its
//! own VLAN, the pod annotated in the reference format, restarts (state thrown away) at
//! every point between the steps with nothing leaked or doubled, branches of deleted pods
//! disassociated and deleted, and convergence while EC2 throttles.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::types::{Filter, InstanceType};
use serde_json::{json, Value};
use vpc_cni_controller::ec2::{default_pacing, Ec2Pacing, SdkEc2};
use vpc_cni_controller::k8s::Kube;
use vpc_cni_controller::model::{parse_pod_eni, BranchEni, POD_ENI_ANNOTATION};
use vpc_cni_controller::reconcile::{Action, Settings};
use vpc_cni_controller::run::Controller;
use vpc_sim::server::{self, Running, Shared};
use vpc_sim::sim::{SimConfig, Simulator};

const CLUSTER: &str = "c1";

/// An owned ENI: (type, status, attached instance, groups, tags, private IP).
type EniRow = (
    String,
    String,
    Option<String>,
    BTreeSet<String>,
    BTreeMap<String, String>,
    Option<String>,
);
/// Owned ENIs by id.
type Owned = BTreeMap<String, EniRow>;

struct World {
    _running: Running,
    sim: Shared,
    ec2: aws_sdk_ec2::Client,
    kube: kube::Client,
    store: common::Shared,
    instance: String,
    subnet: String,
    node_sg: String,
    db_sg: String,
    web_sg: String,
}

fn sdk(endpoint: &str) -> aws_sdk_ec2::Client {
    let conf = aws_sdk_ec2::Config::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new("us-west-2"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_credential_types::Credentials::new(
            "AKIDSIMULATOR",
            "simulator-secret",
            None,
            None,
            "test",
        ))
        .retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled())
        .build();
    aws_sdk_ec2::Client::from_conf(conf)
}

async fn world(cfg: SimConfig) -> World {
    let sim = Shared::new(Simulator::new(SimConfig {
        region: Some("us-west-2".into()),
        ..cfg
    }));
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let running = server::start(sim.clone(), any, any, any)
        .await
        .expect("sim");
    let ec2 = sdk(&running.ec2_url());
    let vpc = ec2
        .create_vpc()
        .cidr_block("10.0.0.0/16")
        .send()
        .await
        .expect("vpc");
    let vpc = vpc
        .vpc()
        .and_then(|v| v.vpc_id())
        .expect("vpc id")
        .to_owned();
    let subnet = ec2
        .create_subnet()
        .vpc_id(&vpc)
        .cidr_block("10.0.1.0/24")
        .availability_zone("us-west-2a")
        .send()
        .await
        .expect("subnet");
    let subnet = subnet
        .subnet()
        .and_then(|s| s.subnet_id())
        .expect("id")
        .to_owned();
    let mut groups = Vec::new();
    for name in ["nodes", "db", "web"] {
        let g = ec2
            .create_security_group()
            .group_name(name)
            .description(name)
            .vpc_id(&vpc)
            .send()
            .await
            .expect("sg");
        groups.push(g.group_id().expect("id").to_owned());
    }
    let run = ec2
        .run_instances()
        .image_id("ami-12c6146b")
        .instance_type(InstanceType::M5Large)
        .min_count(1)
        .max_count(1)
        .subnet_id(&subnet)
        .security_group_ids(&groups[0])
        .send()
        .await
        .expect("instance");
    let instance = run.instances()[0].instance_id().expect("id").to_owned();
    let (kube, store) = common::fake_api();
    {
        let mut s = store.lock().unwrap();
        s.page_size = Some(2);
        s.put(
            "nodes",
            common::node(
                "n1",
                &instance,
                json!({"kubernetes.io/os": "linux",
                "vpc.amazonaws.com/has-trunk-attached": "false"}),
            ),
        );
        s.put("pods", common::pod("ns", "db", "n1", json!({"app": "db"})));
        s.put(
            "pods",
            common::pod("ns", "web", "n1", json!({"app": "web"})),
        );
        s.put(
            "pods",
            common::pod("ns", "plain", "n1", json!({"app": "plain"})),
        );
        s.put(
            "securitygrouppolicies",
            common::policy(
                "ns",
                "db",
                json!({"matchLabels": {"app": "db"}}),
                &[&groups[1]],
            ),
        );
        s.put(
            "securitygrouppolicies",
            common::policy(
                "ns",
                "web",
                json!({"matchLabels": {"app": "web"}}),
                &[&groups[2]],
            ),
        );
        s.put(
            "serviceaccounts",
            common::service_account("ns", "default", json!({})),
        );
    }
    World {
        _running: running,
        sim,
        ec2,
        kube,
        store,
        instance,
        subnet,
        node_sg: groups[0].clone(),
        db_sg: groups[1].clone(),
        web_sg: groups[2].clone(),
    }
}

fn fast_pacing() -> Ec2Pacing {
    Ec2Pacing {
        mutating_per_sec: 1000,
        mutating_burst: 1000,
        describe_per_sec: 1000,
        describe_burst: 1000,
        max_attempts: 12,
        retry_base: Duration::from_millis(1),
    }
}

impl World {
    fn controller(&self, pacing: Ec2Pacing) -> (Controller, SdkEc2) {
        let ec2 = SdkEc2::from_client(
            self.ec2.clone(),
            Arc::new(ipamd::io::ec2::pacer::Pacer::new(pacing)),
            CLUSTER,
        );
        let c = Controller::new(
            Kube::new(self.kube.clone(), CLUSTER),
            Arc::new(ec2.clone()),
            Settings {
                cooldown: Duration::ZERO,
                ..Settings::default()
            },
        );
        (c, ec2)
    }

    /// Every ENI with the cluster tag: id → (type, status, attached instance, groups, tags).
    async fn owned(&self) -> Owned {
        let out = self
            .ec2
            .describe_network_interfaces()
            .filters(
                Filter::builder()
                    .name("tag:kubernetes.io/cluster/c1")
                    .values("owned")
                    .build(),
            )
            .send()
            .await
            .expect("describe");
        out.network_interfaces()
            .iter()
            .map(|n| {
                (
                    n.network_interface_id().unwrap().to_owned(),
                    (
                        n.interface_type()
                            .map(|t| t.as_str().to_owned())
                            .unwrap_or_default(),
                        n.status()
                            .map(|s| s.as_str().to_owned())
                            .unwrap_or_default(),
                        n.attachment()
                            .and_then(|a| a.instance_id())
                            .map(str::to_owned),
                        n.groups()
                            .iter()
                            .filter_map(|g| g.group_id())
                            .map(str::to_owned)
                            .collect(),
                        n.tag_set()
                            .iter()
                            .map(|t| {
                                (
                                    t.key().unwrap().to_owned(),
                                    t.value().unwrap_or("").to_owned(),
                                )
                            })
                            .collect(),
                        n.private_ip_address().map(str::to_owned),
                    ),
                )
            })
            .collect()
    }

    async fn associations(&self, trunk: &str) -> Vec<(String, String, i32)> {
        let out = self
            .ec2
            .describe_trunk_interface_associations()
            .filters(
                Filter::builder()
                    .name("trunk-interface-association.trunk-interface-id")
                    .values(trunk)
                    .build(),
            )
            .send()
            .await
            .expect("associations");
        out.interface_associations()
            .iter()
            .map(|a| {
                (
                    a.association_id().unwrap().to_owned(),
                    a.branch_interface_id().unwrap().to_owned(),
                    a.vlan_id().unwrap(),
                )
            })
            .collect()
    }

    fn annotation(&self, pod: &str) -> Option<Vec<BranchEni>> {
        let s = self.store.lock().unwrap();
        let v = s.get("pods", &format!("ns/{pod}"))?["metadata"]["annotations"][POD_ENI_ANNOTATION]
            .as_str()?
            .to_owned();
        Some(parse_pod_eni(&v).expect("annotation parses"))
    }

    fn trunk(&self, owned: &Owned) -> String {
        let trunks: Vec<&String> = owned
            .iter()
            .filter(|(_, v)| v.0 == "trunk")
            .map(|(k, _)| k)
            .collect();
        assert_eq!(trunks.len(), 1, "one trunk: {owned:?}");
        trunks[0].clone()
    }
}

async fn converge(c: &mut Controller, passes: usize) -> Vec<Action> {
    let mut done = Vec::new();
    for _ in 0..passes {
        let r = c.pass().await.expect("pass");
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        done.extend(r.done);
    }
    done
}

/// The steady state: one trunk attached to the instance; db and web each with one branch
/// carrying exactly its policy's group, associated under the VLAN its annotation says; plain
/// untouched. Returns (trunk, db's branch, web's branch).
async fn check_steady(w: &World) -> (String, BranchEni, BranchEni) {
    let owned = w.owned().await;
    let trunk = w.trunk(&owned);
    assert_eq!(owned[&trunk].2.as_deref(), Some(w.instance.as_str()));
    assert_eq!(owned[&trunk].3, BTreeSet::from([w.node_sg.clone()]));
    assert_eq!(owned.len(), 3, "trunk and two branches: {owned:?}");
    let assocs = w.associations(&trunk).await;
    assert_eq!(assocs.len(), 2, "{assocs:?}");
    let mut out = Vec::new();
    for (pod, sg) in [("db", &w.db_sg), ("web", &w.web_sg)] {
        let ann = w
            .annotation(pod)
            .unwrap_or_else(|| panic!("{pod} annotated"));
        assert_eq!(ann.len(), 1);
        let b = ann[0].clone();
        let eni = &owned[&b.eni_id];
        assert_eq!(eni.3, BTreeSet::from([sg.clone()]), "{pod}'s groups");
        assert_eq!(
            eni.5.as_deref(),
            Some(b.private_ip.as_str()),
            "{pod}'s address"
        );
        assert_eq!(b.subnet_cidr, "10.0.1.0/24");
        assert_eq!(eni.4["vpcresources.k8s.aws/trunk-eni-id"], trunk);
        assert_eq!(eni.4["vpcresources.k8s.aws/vlan-id"], b.vlan_id.to_string());
        assert_eq!(eni.4["eks:eni:owner"], "eks-vpc-resource-controller");
        assert_eq!(eni.4["node.k8s.amazonaws.com/instance_id"], w.instance);
        assert!(
            assocs.contains(&(
                b.association_id.clone(),
                b.eni_id.clone(),
                i32::from(b.vlan_id)
            )),
            "{pod}: {assocs:?}"
        );
        out.push(b);
    }
    assert_ne!(out[0].vlan_id, out[1].vlan_id);
    assert!(w.annotation("plain").is_none());
    let b = out.pop().unwrap();
    let a = out.pop().unwrap();
    (trunk, a, b)
}

#[tokio::test]
async fn trunk_branches_restarts_and_deletion_against_the_simulator() {
    let w = world(SimConfig::default()).await;
    let (mut c, _) = w.controller(fast_pacing());
    let done = converge(&mut c, 1).await;
    assert!(
        done.iter().any(|a| matches!(a, Action::CreateTrunk { .. })),
        "{done:?}"
    );
    assert!(
        done.iter()
            .any(|a| matches!(a, Action::CreateCniNode { .. })),
        "{done:?}"
    );
    {
        let s = w.store.lock().unwrap();
        assert_eq!(
            s.get("nodes", "n1").unwrap()["metadata"]["labels"]
                ["vpc.amazonaws.com/has-trunk-attached"],
            "true"
        );
        let cni = s.get("cninodes", "n1").expect("CNINode");
        assert_eq!(
            cni["spec"]["tags"]["node.k8s.amazonaws.com/instance_id"],
            Value::from(w.instance.as_str())
        );
    }
    let done = converge(&mut c, 1).await;
    assert_eq!(
        done.iter()
            .filter(|a| matches!(a, Action::CreateBranch { .. }))
            .count(),
        2,
        "{done:?}"
    );
    let (trunk, db, web) = check_steady(&w).await;
    // Steady: another pass does nothing.
    assert_eq!(converge(&mut c, 1).await, vec![]);

    // Restart with everything done: nothing to do, nothing doubled.
    let (mut c, _) = w.controller(fast_pacing());
    assert_eq!(converge(&mut c, 2).await, vec![]);

    // Restart after web's branch was associated but before the annotation was written.
    w.store
        .lock()
        .unwrap()
        .objects
        .get_mut("pods")
        .unwrap()
        .get_mut("ns/web")
        .unwrap()["metadata"]["annotations"] = json!({});
    let (mut c, _) = w.controller(fast_pacing());
    let done = converge(&mut c, 1).await;
    assert!(
        matches!(&done[..], [Action::AnnotatePod { .. }]),
        "{done:?}"
    );
    let (_, _, web2) = check_steady(&w).await;
    assert_eq!(web2, web, "the same branch, adopted");

    // Restart after web's branch was created but before it was associated.
    w.ec2
        .disassociate_trunk_interface()
        .association_id(&web.association_id)
        .send()
        .await
        .expect("disassociate");
    w.store
        .lock()
        .unwrap()
        .objects
        .get_mut("pods")
        .unwrap()
        .get_mut("ns/web")
        .unwrap()["metadata"]["annotations"] = json!({});
    let (mut c, _) = w.controller(fast_pacing());
    let done = converge(&mut c, 1).await;
    assert!(
        matches!(&done[..], [Action::AssociateBranch { .. }]),
        "{done:?}"
    );
    let (_, _, web3) = check_steady(&w).await;
    assert_eq!(web3.eni_id, web.eni_id);
    assert_eq!(web3.vlan_id, web.vlan_id);
    assert_ne!(web3.association_id, web.association_id);

    // A branch left by someone (a crash with a lost answer) for a pod that no longer exists,
    // and db deleted: both go, disassociated first; web stays.
    let stray = w
        .ec2
        .create_network_interface()
        .subnet_id(&w.subnet)
        .groups(&w.db_sg)
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::NetworkInterface)
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key("kubernetes.io/cluster/c1")
                        .value("owned")
                        .build(),
                )
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key("eks:eni:owner")
                        .value("eks-vpc-resource-controller")
                        .build(),
                )
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key("vpcresources.k8s.aws/trunk-eni-id")
                        .value(&trunk)
                        .build(),
                )
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key("vpcresources.k8s.aws/vlan-id")
                        .value("77")
                        .build(),
                )
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key("vpc-cni-rs/pod-uid")
                        .value("uid-gone")
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .expect("stray");
    let stray = stray
        .network_interface()
        .unwrap()
        .network_interface_id()
        .unwrap()
        .to_owned();
    w.ec2
        .associate_trunk_interface()
        .branch_interface_id(&stray)
        .trunk_interface_id(&trunk)
        .vlan_id(77)
        .send()
        .await
        .expect("associate stray");
    w.store.lock().unwrap().remove("pods", "ns/db");
    let done = converge(&mut c, 1).await;
    let deleted: BTreeSet<&str> = done
        .iter()
        .filter_map(|a| match a {
            Action::DeleteBranch { eni, association } => {
                assert!(association.is_some(), "disassociated first");
                Some(eni.as_str())
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        deleted,
        BTreeSet::from([db.eni_id.as_str(), stray.as_str()])
    );
    let owned = w.owned().await;
    assert_eq!(owned.len(), 2, "{owned:?}");
    assert!(owned.contains_key(&web.eni_id));
    assert_eq!(w.associations(&trunk).await.len(), 1);

    // web finishes: its branch goes; the trunk stays with its node.
    w.store
        .lock()
        .unwrap()
        .objects
        .get_mut("pods")
        .unwrap()
        .get_mut("ns/web")
        .unwrap()["status"]["phase"] = json!("Succeeded");
    converge(&mut c, 1).await;
    let owned = w.owned().await;
    assert_eq!(owned.keys().collect::<Vec<_>>(), vec![&trunk], "{owned:?}");
    assert!(w.associations(&trunk).await.is_empty());
    assert_eq!(converge(&mut c, 1).await, vec![]);
    let _ = &w.sim;
}

#[tokio::test]
async fn converges_while_ec2_throttles_and_loses_answers() {
    let mut faults = BTreeMap::new();
    faults.insert(
        "*".to_owned(),
        serde_json::from_value(json!({"error_rate": 0.3, "error_code": "RequestLimitExceeded"}))
            .expect("fault"),
    );
    // Half the creations take effect but their answer is lost: the retry makes a second ENI.
    faults.insert(
        "CreateNetworkInterface".to_owned(),
        serde_json::from_value(json!({"lost_response_rate": 0.5, "timeout_ms": 20}))
            .expect("fault"),
    );
    let w = world(SimConfig::default()).await;
    w.sim.with(|s| s.set_faults(faults));
    let (mut c, ec2) = w.controller(fast_pacing());
    for _ in 0..6 {
        let _ = c.pass().await;
    }
    w.sim.with(|s| s.set_faults(BTreeMap::new()));
    converge(&mut c, 2).await;
    check_steady(&w).await;
    // Some creations took effect with their answer lost; the extra ENIs they made are gone
    // (check_steady saw exactly a trunk and two branches).
    let (lost, made) = w.sim.with(|s| {
        let creates: Vec<_> = s
            .calls()
            .iter()
            .filter(|c| c.action == "CreateNetworkInterface")
            .collect();
        (
            creates.iter().filter(|c| c.http_status == 0).count(),
            creates.iter().filter(|c| c.outcome == "ok").count(),
        )
    });
    eprintln!("CreateNetworkInterface: {made} took effect, {lost} answers lost");
    assert!(lost > 0 && made > 3, "lost {lost}, made {made}");
    let stats = ec2.pacer().stats();
    let throttles: u64 = stats.values().map(|s| s.throttles).sum();
    let retries: u64 = stats.values().map(|s| s.retries).sum();
    assert!(throttles > 0 && retries > 0, "{stats:?}");
    let _ = default_pacing();
}
