//! The controller's shell (`run.rs`) with the real kube client over tower-test (`common`'s
//! API-server stand-in) and an in-memory EC2 that fails on demand: the rollback of half-made
//! trunks and branches, and the passes that clean up what a rollback could not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipamd::io::ec2::{Ec2Error, Ec2Result};
use serde_json::json;
use vpc_cni_controller::ec2::{ControllerEc2, InstanceObs, NewEni};
use vpc_cni_controller::k8s::Kube;
use vpc_cni_controller::model::{
    parse_pod_eni, AssociationObs, EniObs, SubnetObs, POD_ENI_ANNOTATION,
};
use vpc_cni_controller::reconcile::{Action, Settings};
use vpc_cni_controller::run::Controller;

#[derive(Default)]
struct Ec2State {
    enis: BTreeMap<String, EniObs>,
    assocs: BTreeMap<String, AssociationObs>,
    next: u32,
    /// Action name → how many of its next calls fail.
    fail: BTreeMap<&'static str, u32>,
    calls: Vec<&'static str>,
}

#[derive(Clone, Default)]
struct FakeEc2(Arc<Mutex<Ec2State>>);

impl FakeEc2 {
    fn call(&self, action: &'static str) -> Ec2Result<std::sync::MutexGuard<'_, Ec2State>> {
        let mut s = self.0.lock().unwrap();
        s.calls.push(action);
        if let Some(n) = s.fail.get_mut(action).filter(|n| **n > 0) {
            *n -= 1;
            return Err(Ec2Error::coded(action, "InvalidParameterValue", "injected"));
        }
        Ok(s)
    }
}

#[async_trait::async_trait]
impl ControllerEc2 for FakeEc2 {
    async fn describe_instance(&self, _: &str) -> Ec2Result<InstanceObs> {
        drop(self.call("DescribeInstances")?);
        Ok(InstanceObs {
            instance_type: "m5.large".into(),
            subnet_id: "subnet-1".into(),
            security_groups: vec!["sg-node".into()],
            used_device_indexes: vec![0],
        })
    }
    async fn max_enis(&self, _: &str) -> Ec2Result<u32> {
        drop(self.call("DescribeInstanceTypes")?);
        Ok(3)
    }
    async fn create_eni(&self, req: &NewEni) -> Ec2Result<EniObs> {
        let mut s = self.call("CreateNetworkInterface")?;
        s.next += 1;
        let n = s.next;
        let mut tags = req.tags.clone();
        tags.insert("eks:eni:owner".into(), "eks-vpc-resource-controller".into());
        let eni = EniObs {
            id: format!("eni-{n:04x}"),
            interface_type: if req.trunk { "trunk" } else { "interface" }.into(),
            status: "available".into(),
            mac: format!("02:00:00:00:00:{n:02x}"),
            private_ip: Some(format!("10.0.1.{n}")),
            ipv6: None,
            subnet_id: req.subnet_id.clone(),
            security_groups: req.security_groups.clone(),
            attached_to: None,
            tags,
        };
        s.enis.insert(eni.id.clone(), eni.clone());
        Ok(eni)
    }
    async fn attach(&self, eni: &str, instance: &str, index: u32) -> Ec2Result<String> {
        let mut s = self.call("AttachNetworkInterface")?;
        assert_eq!(index, 2, "the highest free index of 3");
        let e = s.enis.get_mut(eni).expect("eni");
        e.attached_to = Some(instance.to_owned());
        e.status = "in-use".into();
        Ok(format!("eni-attach-{eni}"))
    }
    async fn set_delete_on_termination(&self, _: &str, _: &str) -> Ec2Result<()> {
        drop(self.call("ModifyNetworkInterfaceAttribute")?);
        Ok(())
    }
    async fn delete_eni(&self, eni: &str) -> Ec2Result<()> {
        let mut s = self.call("DeleteNetworkInterface")?;
        if s.assocs.values().any(|a| a.branch == eni) {
            return Err(Ec2Error::coded(
                "DeleteNetworkInterface",
                "InvalidParameterValue",
                "still associated",
            ));
        }
        s.enis.remove(eni).map(|_| ()).ok_or_else(|| {
            Ec2Error::coded(
                "DeleteNetworkInterface",
                "InvalidNetworkInterfaceID.NotFound",
                eni,
            )
        })
    }
    async fn associate(&self, branch: &str, trunk: &str, vlan: u16) -> Ec2Result<String> {
        let mut s = self.call("AssociateTrunkInterface")?;
        assert!(
            !s.assocs
                .values()
                .any(|a| a.trunk == trunk && a.vlan == vlan),
            "VLAN {vlan} in use"
        );
        s.next += 1;
        let id = format!("trunk-assoc-{:04x}", s.next);
        s.assocs.insert(
            id.clone(),
            AssociationObs {
                id: id.clone(),
                trunk: trunk.into(),
                branch: branch.into(),
                vlan,
            },
        );
        Ok(id)
    }
    async fn disassociate(&self, association: &str) -> Ec2Result<()> {
        let mut s = self.call("DisassociateTrunkInterface")?;
        s.assocs.remove(association).map(|_| ()).ok_or_else(|| {
            Ec2Error::coded(
                "DisassociateTrunkInterface",
                "InvalidAssociationID.NotFound",
                association,
            )
        })
    }
    async fn list_owned(&self) -> Ec2Result<Vec<EniObs>> {
        Ok(self
            .call("DescribeNetworkInterfaces")?
            .enis
            .values()
            .cloned()
            .collect())
    }
    async fn list_associations(&self, trunks: &[String]) -> Ec2Result<Vec<AssociationObs>> {
        let s = self.call("DescribeTrunkInterfaceAssociations")?;
        Ok(s.assocs
            .values()
            .filter(|a| trunks.contains(&a.trunk))
            .cloned()
            .collect())
    }
    async fn describe_subnets(&self, ids: &[String]) -> Ec2Result<BTreeMap<String, SubnetObs>> {
        drop(self.call("DescribeSubnets")?);
        Ok(ids
            .iter()
            .map(|i| {
                (
                    i.clone(),
                    SubnetObs {
                        cidr: "10.0.1.0/24".into(),
                        ipv6_cidr: None,
                    },
                )
            })
            .collect())
    }
}

fn controller(ec2: &FakeEc2, kube: &kube::Client) -> Controller {
    Controller::new(
        Kube::new(kube.clone(), "c1"),
        Arc::new(ec2.clone()),
        Settings {
            cooldown: Duration::ZERO,
            ..Settings::default()
        },
    )
}

fn cluster() -> (kube::Client, common::Shared) {
    let (kube, store) = common::fake_api();
    {
        let mut s = store.lock().unwrap();
        s.put(
            "nodes",
            common::node(
                "n1",
                "i-0abc",
                json!({"vpc.amazonaws.com/has-trunk-attached": "false"}),
            ),
        );
        s.put("pods", common::pod("ns", "db", "n1", json!({"app": "db"})));
        s.put(
            "securitygrouppolicies",
            common::policy(
                "ns",
                "db",
                json!({"matchLabels": {"app": "db"}}),
                &["sg-db"],
            ),
        );
    }
    (kube, store)
}

#[tokio::test]
async fn half_made_trunks_and_branches_are_undone_or_cleaned_up() {
    let (kube, store) = cluster();
    let ec2 = FakeEc2::default();
    let mut c = controller(&ec2, &kube);

    // The trunk's attach fails: the trunk ENI is deleted at once, the next pass retries.
    ec2.0
        .lock()
        .unwrap()
        .fail
        .insert("AttachNetworkInterface", 1);
    let r = c.pass().await.expect("pass");
    assert_eq!(r.failed.len(), 1, "{:?}", r.failed);
    assert!(ec2.0.lock().unwrap().enis.is_empty());
    let r = c.pass().await.expect("pass");
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert_eq!(ec2.0.lock().unwrap().enis.len(), 1);

    // The branch's association fails: the branch ENI is deleted; a Warning event on the pod.
    ec2.0
        .lock()
        .unwrap()
        .fail
        .insert("AssociateTrunkInterface", 1);
    let r = c.pass().await.expect("pass");
    assert!(
        matches!(&r.failed[..], [(Action::CreateBranch { .. }, _)]),
        "{:?}",
        r.failed
    );
    assert_eq!(ec2.0.lock().unwrap().enis.len(), 1, "only the trunk");
    {
        let s = store.lock().unwrap();
        let events: Vec<_> = s
            .objects
            .get("events")
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        let reasons: BTreeSet<(String, String)> = events
            .iter()
            .map(|e| {
                (
                    e["reason"].as_str().unwrap().to_owned(),
                    e["involvedObject"]["name"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(
            reasons,
            BTreeSet::from([
                ("BranchTrunkENICreationFailed".to_owned(), "n1".to_owned()),
                ("BranchAllocationFailed".to_owned(), "db".to_owned()),
            ])
        );
    }

    // The undo itself fails too: the half-made branch is tagged with the pod's uid, so the
    // next pass adopts it (associates and annotates) instead of making another.
    {
        let mut s = ec2.0.lock().unwrap();
        s.fail.insert("AssociateTrunkInterface", 1);
        s.fail.insert("DeleteNetworkInterface", 1);
    }
    let r = c.pass().await.expect("pass");
    assert_eq!(r.failed.len(), 1);
    assert_eq!(
        ec2.0.lock().unwrap().enis.len(),
        2,
        "trunk and the left branch"
    );
    let r = c.pass().await.expect("pass");
    assert!(
        matches!(&r.done[..], [Action::AssociateBranch { .. }]),
        "{:?}",
        r.done
    );
    let left: BTreeSet<String> = ec2.0.lock().unwrap().enis.keys().cloned().collect();
    let ann = store.lock().unwrap().get("pods", "ns/db").unwrap()["metadata"]["annotations"]
        [POD_ENI_ANNOTATION]
        .as_str()
        .map(str::to_owned)
        .expect("annotated");
    let ann = parse_pod_eni(&ann).expect("parses");
    assert!(left.contains(&ann[0].eni_id));
    assert_eq!(ann[0].vlan_id, 1);
    assert_eq!(left.len(), 2);

    // Steady; then the pod is re-created under the same name (new uid) before the controller
    // sees the deletion: the old branch is released and the new pod gets its own.
    assert!(c.pass().await.expect("pass").done.is_empty());
    {
        let mut s = store.lock().unwrap();
        let mut p = common::pod("ns", "db", "n1", json!({"app": "db"}));
        p["metadata"]["uid"] = json!("uid-new");
        s.put("pods", p);
    }
    let r = c.pass().await.expect("pass");
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    let kinds: Vec<&str> = r
        .done
        .iter()
        .map(|a| match a {
            Action::DeleteBranch { .. } => "delete",
            Action::CreateBranch { .. } => "create",
            _ => "other",
        })
        .collect();
    // The old branch: its pod-uid tag names a pod that no longer exists and nobody's
    // annotation names it, so it goes in the same pass.
    assert_eq!(kinds, ["delete", "create"], "{:?}", r.done);
    assert!(c.pass().await.expect("pass").done.is_empty());
    let s = ec2.0.lock().unwrap();
    assert_eq!(s.enis.len(), 2);
    assert_eq!(s.assocs.len(), 1);
}
