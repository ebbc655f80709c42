//! EC2 behind a narrow trait in the reconcile's nouns ([`ControllerEc2`]), implemented over
//! `aws-sdk-ec2` by [`SdkEc2`]: every call goes through ipamd's [`Pacer`] (a `governor` rate
//! limiter per call class, retries with backoff and jitter on throttling, 5xx and transport
//! failures) with the SDK's own retries off, and the calls ipamd already makes (device
//! indexes, instance type limits, attach, delete) reuse ipamd's client.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::types::{
    Filter, NetworkInterface, NetworkInterfaceCreationType, ResourceType, Tag, TagSpecification,
};
use ipamd::io::ec2::aws::{sdk_client, sdk_error, AwsEc2, AwsSettings};
use ipamd::io::ec2::pacer::Pacer;
use ipamd::io::ec2::{Ec2Api, Ec2Error, Ec2Result, ErrorKind};

use crate::model::{cluster_tag, AssociationObs, EniObs, SubnetObs, CLUSTER_TAG_VALUE, TAG_OWNER};

pub use ipamd::config::Ec2Pacing;

/// What the controller needs of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceObs {
    /// Instance type.
    pub instance_type: String,
    /// Subnet of its primary ENI.
    pub subnet_id: String,
    /// Security groups of its primary ENI.
    pub security_groups: Vec<String>,
    /// Device indexes in use on network card 0.
    pub used_device_indexes: Vec<u32>,
}

/// `CreateNetworkInterface` of a trunk or a branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEni {
    /// Subnet.
    pub subnet_id: String,
    /// Security groups (none: the VPC's default group, as EC2 does).
    pub security_groups: Vec<String>,
    /// Description.
    pub description: String,
    /// `InterfaceType=trunk`.
    pub trunk: bool,
    /// Tags (the owner and cluster tags are added by the implementation).
    pub tags: BTreeMap<String, String>,
}

/// The EC2 calls the controller makes.
#[async_trait::async_trait]
pub trait ControllerEc2: Send + Sync {
    /// `DescribeInstances` of one instance.
    async fn describe_instance(&self, instance_id: &str) -> Ec2Result<InstanceObs>;
    /// `DescribeInstanceTypes`: the most ENIs the type takes.
    async fn max_enis(&self, instance_type: &str) -> Ec2Result<u32>;
    /// `CreateNetworkInterface` with the controller's owner and cluster tags.
    async fn create_eni(&self, req: &NewEni) -> Ec2Result<EniObs>;
    /// `AttachNetworkInterface`; the attachment id.
    async fn attach(&self, eni: &str, instance_id: &str, device_index: u32) -> Ec2Result<String>;
    /// `ModifyNetworkInterfaceAttribute` `DeleteOnTermination=true`.
    async fn set_delete_on_termination(&self, eni: &str, attachment: &str) -> Ec2Result<()>;
    /// `DeleteNetworkInterface`.
    async fn delete_eni(&self, eni: &str) -> Ec2Result<()>;
    /// `AssociateTrunkInterface`; the association id.
    async fn associate(&self, branch: &str, trunk: &str, vlan: u16) -> Ec2Result<String>;
    /// `DisassociateTrunkInterface`.
    async fn disassociate(&self, association: &str) -> Ec2Result<()>;
    /// `DescribeNetworkInterfaces` of every ENI with the owner tag and this cluster's tag.
    async fn list_owned(&self) -> Ec2Result<Vec<EniObs>>;
    /// `DescribeTrunkInterfaceAssociations` of these trunks.
    async fn list_associations(&self, trunks: &[String]) -> Ec2Result<Vec<AssociationObs>>;
    /// `DescribeSubnets` of these subnets.
    async fn describe_subnets(&self, ids: &[String]) -> Ec2Result<BTreeMap<String, SubnetObs>>;
}

/// How to build the SDK client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdkSettings {
    /// Region.
    pub region: String,
    /// Endpoint override (the simulator).
    pub endpoint: Option<String>,
    /// Static credentials (access key, secret) instead of the default chain.
    pub static_credentials: Option<(String, String)>,
    /// Per-attempt HTTP timeout.
    pub http_timeout: Duration,
    /// The cluster name (tag `kubernetes.io/cluster/<name>=owned`).
    pub cluster: String,
}

/// [`ControllerEc2`] over `aws-sdk-ec2`, paced and retried.
#[derive(Clone)]
pub struct SdkEc2 {
    client: aws_sdk_ec2::Client,
    shared: AwsEc2,
    pacer: Arc<Pacer>,
    cluster: String,
}

impl std::fmt::Debug for SdkEc2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdkEc2")
            .field("cluster", &self.cluster)
            .field("pacer", &self.pacer)
            .finish_non_exhaustive()
    }
}

/// The default pacing: ipamd's defaults (5 mutating calls a second, burst 20; 20 describes a
/// second; 8 attempts from 200 ms).
pub fn default_pacing() -> Ec2Pacing {
    Ec2Pacing {
        mutating_per_sec: 5,
        mutating_burst: 20,
        describe_per_sec: 20,
        describe_burst: 20,
        max_attempts: 8,
        retry_base: Duration::from_millis(200),
    }
}

impl SdkEc2 {
    /// Builds the client as ipamd does ([`sdk_client`]: SDK retries off, the pacer
    /// retries), with the user agent `vpc-resource-controller/<version>`.
    pub async fn new(s: &SdkSettings, pacing: Ec2Pacing) -> SdkEc2 {
        let settings = AwsSettings {
            region: s.region.clone(),
            endpoint: s.endpoint.clone(),
            http_timeout: s.http_timeout,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            static_credentials: s.static_credentials.clone(),
        };
        let agent = format!("vpc-resource-controller/{}", settings.version);
        let client = sdk_client(&settings, &agent).await;
        SdkEc2::from_client(client, Arc::new(Pacer::new(pacing)), &s.cluster)
    }

    /// Wraps an existing client.
    pub fn from_client(client: aws_sdk_ec2::Client, pacer: Arc<Pacer>, cluster: &str) -> SdkEc2 {
        SdkEc2 {
            shared: AwsEc2::from_client(client.clone()),
            client,
            pacer,
            cluster: cluster.to_owned(),
        }
    }

    /// The pacer (call counts per action).
    pub fn pacer(&self) -> &Pacer {
        &self.pacer
    }
}

fn bad_answer(action: &'static str, what: &str) -> Ec2Error {
    Ec2Error {
        action,
        code: "BadAnswer".into(),
        message: what.to_owned(),
        kind: ErrorKind::Client,
    }
}

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

fn eni_of(action: &'static str, n: &NetworkInterface) -> Ec2Result<EniObs> {
    let id = n
        .network_interface_id()
        .ok_or_else(|| bad_answer(action, "a network interface without networkInterfaceId"))?;
    Ok(EniObs {
        id: id.to_owned(),
        interface_type: n
            .interface_type()
            .map(|t| t.as_str().to_owned())
            .unwrap_or_else(|| "interface".to_owned()),
        status: n
            .status()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
        mac: n.mac_address().unwrap_or_default().to_ascii_lowercase(),
        private_ip: n.private_ip_address().map(str::to_owned),
        ipv6: n.ipv6_address().map(str::to_owned).or_else(|| {
            n.ipv6_addresses()
                .iter()
                .find_map(|a| a.ipv6_address().map(str::to_owned))
        }),
        subnet_id: n.subnet_id().unwrap_or_default().to_owned(),
        security_groups: n
            .groups()
            .iter()
            .filter_map(|g| g.group_id().map(str::to_owned))
            .collect(),
        attached_to: n
            .attachment()
            .and_then(|a| a.instance_id())
            .map(str::to_owned),
        tags: n
            .tag_set()
            .iter()
            .filter_map(|t| Some((t.key()?.to_owned(), t.value().unwrap_or("").to_owned())))
            .collect(),
    })
}

#[async_trait::async_trait]
impl ControllerEc2 for SdkEc2 {
    async fn describe_instance(&self, instance_id: &str) -> Ec2Result<InstanceObs> {
        const A: &str = "DescribeInstances";
        let out = self
            .pacer
            .call(A, || async {
                self.client
                    .describe_instances()
                    .instance_ids(instance_id)
                    .send()
                    .await
                    .map_err(|e| sdk_error(A, e))
            })
            .await?;
        let inst = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(instance_id))
            .ok_or_else(|| {
                Ec2Error::coded(
                    A,
                    "InvalidInstanceID.NotFound",
                    format!("no instance {instance_id}"),
                )
            })?;
        let primary = inst
            .network_interfaces()
            .iter()
            .find(|n| n.attachment().and_then(|a| a.device_index()) == Some(0))
            .ok_or_else(|| bad_answer(A, "the instance has no ENI at device index 0"))?;
        let used_device_indexes = inst
            .network_interfaces()
            .iter()
            .filter_map(|n| n.attachment())
            .filter(|a| a.network_card_index().unwrap_or(0) == 0)
            .filter_map(|a| a.device_index())
            .filter_map(|i| u32::try_from(i).ok())
            .collect();
        Ok(InstanceObs {
            instance_type: inst
                .instance_type()
                .map(|t| t.as_str().to_owned())
                .unwrap_or_default(),
            subnet_id: primary
                .subnet_id()
                .or(inst.subnet_id())
                .ok_or_else(|| bad_answer(A, "the primary ENI has no subnetId"))?
                .to_owned(),
            security_groups: primary
                .groups()
                .iter()
                .filter_map(|g| g.group_id().map(str::to_owned))
                .collect(),
            used_device_indexes,
        })
    }

    async fn max_enis(&self, instance_type: &str) -> Ec2Result<u32> {
        let info = self
            .pacer
            .call("DescribeInstanceTypes", || {
                self.shared.describe_instance_type(instance_type)
            })
            .await?;
        Ok(info.max_enis)
    }

    async fn create_eni(&self, req: &NewEni) -> Ec2Result<EniObs> {
        const A: &str = "CreateNetworkInterface";
        let mut tags: Vec<Tag> = req
            .tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        tags.push(Tag::builder().key(TAG_OWNER.0).value(TAG_OWNER.1).build());
        tags.push(
            Tag::builder()
                .key(cluster_tag(&self.cluster))
                .value(CLUSTER_TAG_VALUE)
                .build(),
        );
        let spec = TagSpecification::builder()
            .resource_type(ResourceType::NetworkInterface)
            .set_tags(Some(tags))
            .build();
        let out = self
            .pacer
            .call(A, || async {
                let mut call = self
                    .client
                    .create_network_interface()
                    .subnet_id(&req.subnet_id)
                    .description(&req.description)
                    .tag_specifications(spec.clone());
                for g in &req.security_groups {
                    call = call.groups(g);
                }
                if req.trunk {
                    call = call.interface_type(NetworkInterfaceCreationType::Trunk);
                }
                call.send().await.map_err(|e| sdk_error(A, e))
            })
            .await?;
        let n = out
            .network_interface()
            .ok_or_else(|| bad_answer(A, "no networkInterface in the answer"))?;
        eni_of(A, n)
    }

    async fn attach(&self, eni: &str, instance_id: &str, device_index: u32) -> Ec2Result<String> {
        self.pacer
            .call("AttachNetworkInterface", || {
                self.shared.attach_eni(eni, instance_id, device_index, 0)
            })
            .await
    }

    async fn set_delete_on_termination(&self, eni: &str, attachment: &str) -> Ec2Result<()> {
        self.pacer
            .call("ModifyNetworkInterfaceAttribute", || {
                self.shared.set_delete_on_termination(eni, attachment)
            })
            .await
    }

    async fn delete_eni(&self, eni: &str) -> Ec2Result<()> {
        self.pacer
            .call("DeleteNetworkInterface", || self.shared.delete_eni(eni))
            .await
    }

    async fn associate(&self, branch: &str, trunk: &str, vlan: u16) -> Ec2Result<String> {
        const A: &str = "AssociateTrunkInterface";
        let out = self
            .pacer
            .call(A, || async {
                self.client
                    .associate_trunk_interface()
                    .branch_interface_id(branch)
                    .trunk_interface_id(trunk)
                    .vlan_id(i32::from(vlan))
                    .send()
                    .await
                    .map_err(|e| sdk_error(A, e))
            })
            .await?;
        out.interface_association()
            .and_then(|a| a.association_id())
            .map(str::to_owned)
            .ok_or_else(|| bad_answer(A, "no interfaceAssociation.associationId in the answer"))
    }

    async fn disassociate(&self, association: &str) -> Ec2Result<()> {
        const A: &str = "DisassociateTrunkInterface";
        self.pacer
            .call(A, || async {
                self.client
                    .disassociate_trunk_interface()
                    .association_id(association)
                    .send()
                    .await
                    .map_err(|e| sdk_error(A, e))
            })
            .await?;
        Ok(())
    }

    async fn list_owned(&self) -> Ec2Result<Vec<EniObs>> {
        const A: &str = "DescribeNetworkInterfaces";
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        let mut seen_tokens = std::collections::BTreeSet::new();
        loop {
            let page = self
                .pacer
                .call(A, || async {
                    self.client
                        .describe_network_interfaces()
                        .filters(filter(&format!("tag:{}", TAG_OWNER.0), TAG_OWNER.1))
                        .filters(filter(
                            &format!("tag:{}", cluster_tag(&self.cluster)),
                            CLUSTER_TAG_VALUE,
                        ))
                        .max_results(1000)
                        .set_next_token(token.clone())
                        .send()
                        .await
                        .map_err(|e| sdk_error(A, e))
                })
                .await?;
            for n in page.network_interfaces() {
                out.push(eni_of(A, n)?);
            }
            match page.next_token().filter(|t| !t.is_empty()) {
                Some(t) if seen_tokens.insert(t.to_owned()) => token = Some(t.to_owned()),
                Some(t) => return Err(bad_answer(A, &format!("NextToken {t:?} repeated"))),
                None => return Ok(out),
            }
        }
    }

    async fn list_associations(&self, trunks: &[String]) -> Ec2Result<Vec<AssociationObs>> {
        const A: &str = "DescribeTrunkInterfaceAssociations";
        let mut out = Vec::new();
        if trunks.is_empty() {
            return Ok(out);
        }
        let mut token: Option<String> = None;
        let mut seen_tokens = std::collections::BTreeSet::new();
        loop {
            let page = self
                .pacer
                .call(A, || async {
                    self.client
                        .describe_trunk_interface_associations()
                        .filters(
                            Filter::builder()
                                .name("trunk-interface-association.trunk-interface-id")
                                .set_values(Some(trunks.to_vec()))
                                .build(),
                        )
                        .max_results(255)
                        .set_next_token(token.clone())
                        .send()
                        .await
                        .map_err(|e| sdk_error(A, e))
                })
                .await?;
            for a in page.interface_associations() {
                let field = |v: Option<&str>, name: &str| {
                    v.map(str::to_owned)
                        .ok_or_else(|| bad_answer(A, &format!("an association without {name}")))
                };
                let vlan = a
                    .vlan_id()
                    .and_then(|v| u16::try_from(v).ok())
                    .ok_or_else(|| bad_answer(A, "an association without a usable vlanId"))?;
                out.push(AssociationObs {
                    id: field(a.association_id(), "associationId")?,
                    trunk: field(a.trunk_interface_id(), "trunkInterfaceId")?,
                    branch: field(a.branch_interface_id(), "branchInterfaceId")?,
                    vlan,
                });
            }
            match page.next_token().filter(|t| !t.is_empty()) {
                Some(t) if seen_tokens.insert(t.to_owned()) => token = Some(t.to_owned()),
                Some(t) => return Err(bad_answer(A, &format!("NextToken {t:?} repeated"))),
                None => return Ok(out),
            }
        }
    }

    async fn describe_subnets(&self, ids: &[String]) -> Ec2Result<BTreeMap<String, SubnetObs>> {
        const A: &str = "DescribeSubnets";
        if ids.is_empty() {
            return Ok(BTreeMap::new());
        }
        let out = self
            .pacer
            .call(A, || async {
                self.client
                    .describe_subnets()
                    .set_subnet_ids(Some(ids.to_vec()))
                    .send()
                    .await
                    .map_err(|e| sdk_error(A, e))
            })
            .await?;
        let mut map = BTreeMap::new();
        for s in out.subnets() {
            let Some(id) = s.subnet_id() else { continue };
            map.insert(
                id.to_owned(),
                SubnetObs {
                    cidr: s.cidr_block().unwrap_or_default().to_owned(),
                    ipv6_cidr: s
                        .ipv6_cidr_block_association_set()
                        .iter()
                        .find_map(|a| a.ipv6_cidr_block().map(str::to_owned)),
                },
            );
        }
        Ok(map)
    }
}
