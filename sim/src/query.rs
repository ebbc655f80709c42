//! EC2 Query protocol input: form parameters (`Action=...&Foo.1.Bar=...`) parsed and validated
//! into a [`Request`]. Nothing here touches state: a request that fails to parse never reaches
//! the model.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::str::FromStr;

use subnet_calc::subnet::Ipv4Cidr;

use crate::api::{CreateEni, EniAttribute, Filter, Page, Request, RunInstances, ACTIONS};
use crate::error::ApiError;
use crate::ipv6::Ipv6Block;
use crate::model::Tags;

/// Form parameters of one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    map: BTreeMap<String, String>,
}

impl Params {
    /// From decoded `(name, value)` pairs; a repeated name keeps its last value.
    pub fn from_pairs<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Self {
        Self {
            map: pairs.into_iter().collect(),
        }
    }

    /// From an `application/x-www-form-urlencoded` body.
    pub fn from_form(body: &[u8]) -> Self {
        Self::from_pairs(form_urlencoded::parse(body).into_owned())
    }

    /// All pairs, sorted by name.
    pub fn pairs(&self) -> impl Iterator<Item = (&String, &String)> {
        self.map.iter()
    }

    /// A parameter's value.
    pub fn get(&self, k: &str) -> Option<&str> {
        self.map.get(k).map(String::as_str)
    }

    fn req(&self, k: &str) -> Result<String, ApiError> {
        match self.get(k) {
            Some(v) if !v.is_empty() => Ok(v.to_owned()),
            _ => Err(ApiError::missing(k)),
        }
    }

    fn int(&self, k: &str) -> Result<Option<i64>, ApiError> {
        self.get(k)
            .map(|v| {
                v.trim()
                    .parse::<i64>()
                    .map_err(|_| ApiError::bad_value(k, v, "Expected an integer."))
            })
            .transpose()
    }

    fn boolean(&self, k: &str) -> Result<Option<bool>, ApiError> {
        self.get(k)
            .map(|v| match v.to_ascii_lowercase().as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(ApiError::bad_value(k, v, "Expected true or false.")),
            })
            .transpose()
    }

    fn parsed<T: FromStr>(&self, k: &str, what: &str) -> Result<Option<T>, ApiError> {
        self.get(k)
            .map(|v| {
                v.trim().parse::<T>().map_err(|_| {
                    ApiError::invalid(format!("Invalid value '{v}' for {what} ({k})."))
                })
            })
            .transpose()
    }

    /// Members `prefix.N...` grouped by `N` (ascending), each as its own [`Params`] with the
    /// `prefix.N.` part removed (a scalar member `prefix.N` appears under the empty name).
    fn members(&self, prefix: &str) -> Result<Vec<Params>, ApiError> {
        let mut groups: BTreeMap<u32, Params> = BTreeMap::new();
        let p = format!("{prefix}.");
        for (k, v) in self.map.range(p.clone()..) {
            let Some(rest) = k.strip_prefix(&p) else {
                break;
            };
            let (n, sub) = rest.split_once('.').unwrap_or((rest, ""));
            let n: u32 = n.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                ApiError::new(
                    "UnknownParameter",
                    format!("The parameter {k} is not recognized"),
                )
            })?;
            groups
                .entry(n)
                .or_default()
                .map
                .insert(sub.to_owned(), v.clone());
        }
        Ok(groups.into_values().collect())
    }

    /// A list of scalars `prefix.N`.
    fn list(&self, prefix: &str) -> Result<Vec<String>, ApiError> {
        Ok(self
            .members(prefix)?
            .into_iter()
            .filter_map(|m| m.map.get("").cloned())
            .collect())
    }

    fn list_parsed<T: FromStr>(
        &self,
        prefix: &str,
        member: &str,
        what: &str,
    ) -> Result<Vec<T>, ApiError> {
        let mut out = Vec::new();
        for m in self.members(prefix)? {
            if let Some(v) = m.parsed::<T>(member, what)? {
                out.push(v);
            }
        }
        Ok(out)
    }

    fn filters(&self) -> Result<Vec<Filter>, ApiError> {
        let mut out = Vec::new();
        for m in self.members("Filter")? {
            let name = m
                .req("Name")
                .map_err(|_| ApiError::missing("Filter.N.Name"))?;
            out.push(Filter {
                name,
                values: m.list("Value")?,
            });
        }
        Ok(out)
    }

    fn page(&self) -> Result<Page, ApiError> {
        Ok(Page {
            max_results: self.int("MaxResults")?,
            next_token: self.get("NextToken").map(str::to_owned),
        })
    }

    fn tag_list(&self, prefix: &str) -> Result<Vec<(String, Option<String>)>, ApiError> {
        let mut out = Vec::new();
        for t in self.members(prefix)? {
            let key = t
                .get("Key")
                .ok_or_else(|| ApiError::missing(&format!("{prefix}.N.Key")))?;
            out.push((key.to_owned(), t.get("Value").map(str::to_owned)));
        }
        Ok(out)
    }

    /// Tags of `TagSpecification.N` by resource type.
    fn tag_specs(&self, allowed: &[&str]) -> Result<BTreeMap<String, Tags>, ApiError> {
        let mut out: BTreeMap<String, Tags> = BTreeMap::new();
        for spec in self.members("TagSpecification")? {
            let rt = spec
                .req("ResourceType")
                .map_err(|_| ApiError::missing("TagSpecification.N.ResourceType"))?;
            if !allowed.contains(&rt.as_str()) {
                return Err(ApiError::bad_value(
                    "TagSpecification.ResourceType",
                    &rt,
                    "The resource type is not supported by this action.",
                ));
            }
            let tags = out.entry(rt).or_default();
            for (k, v) in spec.tag_list("Tag")? {
                tags.insert(k, v.unwrap_or_default());
            }
        }
        Ok(out)
    }
}

/// Top-level parameters each action accepts (besides `Action`, `Version`, `DryRun`).
fn accepted(action: &str) -> &'static [&'static str] {
    match action {
        "CreateVpc" => &[
            "CidrBlock",
            "AmazonProvidedIpv6CidrBlock",
            "InstanceTenancy",
            "TagSpecification",
        ],
        "CreateSubnet" => &[
            "VpcId",
            "CidrBlock",
            "AvailabilityZone",
            "AvailabilityZoneId",
            "Ipv6CidrBlock",
            "TagSpecification",
        ],
        "AssociateVpcCidrBlock" => &[
            "VpcId",
            "AmazonProvidedIpv6CidrBlock",
            "CidrBlock",
            "Ipv6CidrBlockNetworkBorderGroup",
        ],
        "AssociateSubnetCidrBlock" => &["SubnetId", "Ipv6CidrBlock"],
        "DescribeVpcs" => &["VpcId", "Filter", "MaxResults", "NextToken"],
        "CreateSecurityGroup" => &["GroupName", "GroupDescription", "VpcId", "TagSpecification"],
        "RunInstances" => &[
            "ImageId",
            "InstanceType",
            "MinCount",
            "MaxCount",
            "SubnetId",
            "SecurityGroupId",
            "SecurityGroup",
            "PrivateIpAddress",
            "Ipv6AddressCount",
            "TagSpecification",
            "ClientToken",
            "KeyName",
            "UserData",
            "Placement",
            "Monitoring",
            "EbsOptimized",
            "IamInstanceProfile",
            "MetadataOptions",
            "BlockDeviceMapping",
        ],
        "TerminateInstances" => &["InstanceId", "Force", "SkipOsShutdown"],
        "DescribeInstances" => &["InstanceId", "Filter", "MaxResults", "NextToken"],
        "DescribeInstanceTypes" => &["InstanceType", "Filter", "MaxResults", "NextToken"],
        "DescribeSubnets" => &["SubnetId", "Filter", "MaxResults", "NextToken"],
        "DescribeNetworkInterfaces" => &["NetworkInterfaceId", "Filter", "MaxResults", "NextToken"],
        "CreateNetworkInterface" => &[
            "SubnetId",
            "Description",
            "PrivateIpAddress",
            "PrivateIpAddresses",
            "SecondaryPrivateIpAddressCount",
            "Ipv4Prefix",
            "Ipv4PrefixCount",
            "Ipv6Addresses",
            "Ipv6AddressCount",
            "Ipv6Prefix",
            "Ipv6PrefixCount",
            "SecurityGroupId",
            "TagSpecification",
            "InterfaceType",
            "ClientToken",
            "ConnectionTrackingSpecification",
        ],
        "AttachNetworkInterface" => &[
            "NetworkInterfaceId",
            "InstanceId",
            "DeviceIndex",
            "NetworkCardIndex",
        ],
        "DetachNetworkInterface" => &["AttachmentId", "Force"],
        "DeleteNetworkInterface" => &["NetworkInterfaceId"],
        "ModifyNetworkInterfaceAttribute" => &[
            "NetworkInterfaceId",
            "Attachment",
            "SecurityGroupId",
            "Description",
            "SourceDestCheck",
        ],
        "AssignPrivateIpAddresses" => &[
            "NetworkInterfaceId",
            "SecondaryPrivateIpAddressCount",
            "PrivateIpAddress",
            "Ipv4Prefix",
            "Ipv4PrefixCount",
            "AllowReassignment",
        ],
        "UnassignPrivateIpAddresses" => &["NetworkInterfaceId", "PrivateIpAddress", "Ipv4Prefix"],
        "AssignIpv6Addresses" => &[
            "NetworkInterfaceId",
            "Ipv6AddressCount",
            "Ipv6Addresses",
            "Ipv6PrefixCount",
            "Ipv6Prefix",
        ],
        "UnassignIpv6Addresses" => &["NetworkInterfaceId", "Ipv6Addresses", "Ipv6Prefix"],
        "AssociateTrunkInterface" => &[
            "BranchInterfaceId",
            "TrunkInterfaceId",
            "VlanId",
            "GreKey",
            "ClientToken",
        ],
        "DisassociateTrunkInterface" => &["AssociationId", "ClientToken"],
        "DescribeTrunkInterfaceAssociations" => {
            &["AssociationId", "Filter", "MaxResults", "NextToken"]
        }
        "CreateTags" | "DeleteTags" => &["ResourceId", "Tag"],
        _ => &[],
    }
}

/// A parsed request and whether it asked for a dry run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The request.
    pub request: Request,
    /// `DryRun=true`.
    pub dry_run: bool,
}

/// The action name of a request, validated against the implemented actions.
pub fn action(p: &Params) -> Result<&'static str, ApiError> {
    let a = p.get("Action").ok_or_else(|| {
        ApiError::new(
            "MissingAction",
            "The request must contain the parameter Action",
        )
    })?;
    ACTIONS.iter().copied().find(|x| *x == a).ok_or_else(|| {
        ApiError::new(
            "InvalidAction",
            format!("The action {a} is not valid for this web service."),
        )
    })
}

/// Parses and validates one request.
pub fn parse(p: &Params) -> Result<Parsed, ApiError> {
    let action = action(p)?;
    let ok = accepted(action);
    for k in p.map.keys() {
        let top = k.split('.').next().unwrap_or("");
        if !["Action", "Version", "DryRun"].contains(&top) && !ok.contains(&top) {
            return Err(ApiError::new(
                "UnknownParameter",
                format!("The parameter {k} is not recognized"),
            ));
        }
    }
    let dry_run = p.boolean("DryRun")?.unwrap_or(false);
    let v4 = |k: &str| p.parsed::<Ipv4Addr>(k, "IPv4 address");
    let cidr = |k: &str| -> Result<Ipv4Cidr, ApiError> {
        let v = p.req(k)?;
        v.parse().map_err(|_| {
            ApiError::invalid(format!(
                "Value ({v}) for parameter cidrBlock is invalid. This is not a valid CIDR block."
            ))
        })
    };
    let single_tags = |rt: &[&str]| -> Result<Tags, ApiError> {
        Ok(p.tag_specs(rt)?.into_values().next().unwrap_or_default())
    };
    let request = match action {
        "CreateVpc" => Request::CreateVpc {
            cidr: cidr("CidrBlock")?,
            amazon_ipv6: p.boolean("AmazonProvidedIpv6CidrBlock")?.unwrap_or(false),
            tags: single_tags(&["vpc"])?,
        },
        "CreateSubnet" => Request::CreateSubnet {
            vpc_id: p.req("VpcId")?,
            cidr: cidr("CidrBlock")?,
            availability_zone: p.get("AvailabilityZone").map(str::to_owned),
            ipv6_cidr: p.parsed::<Ipv6Block>("Ipv6CidrBlock", "IPv6 CIDR block")?,
            tags: single_tags(&["subnet"])?,
        },
        "AssociateVpcCidrBlock" => {
            if p.get("CidrBlock").is_some() {
                return Err(ApiError::new(
                    "UnsupportedOperation",
                    "The simulator associates only Amazon-provided IPv6 blocks (AmazonProvidedIpv6CidrBlock), not secondary IPv4 CidrBlock.",
                ));
            }
            let amazon_ipv6 = p.boolean("AmazonProvidedIpv6CidrBlock")?.unwrap_or(false);
            if !amazon_ipv6 {
                return Err(ApiError::missing("AmazonProvidedIpv6CidrBlock"));
            }
            Request::AssociateVpcCidrBlock {
                vpc_id: p.req("VpcId")?,
                amazon_ipv6,
            }
        }
        "AssociateSubnetCidrBlock" => Request::AssociateSubnetCidrBlock {
            subnet_id: p.req("SubnetId")?,
            ipv6_cidr: p
                .parsed::<Ipv6Block>("Ipv6CidrBlock", "IPv6 CIDR block")?
                .ok_or_else(|| ApiError::missing("Ipv6CidrBlock"))?,
        },
        "DescribeVpcs" => Request::DescribeVpcs {
            ids: p.list("VpcId")?,
            filters: p.filters()?,
            page: p.page()?,
        },
        "CreateSecurityGroup" => Request::CreateSecurityGroup {
            vpc_id: p.get("VpcId").map(str::to_owned),
            name: p.req("GroupName")?,
            description: p.req("GroupDescription")?,
            tags: single_tags(&["security-group"])?,
        },
        "RunInstances" => {
            let mut specs = p.tag_specs(&["instance", "network-interface", "volume"])?;
            Request::RunInstances(RunInstances {
                image_id: p.req("ImageId")?,
                instance_type: p.get("InstanceType").unwrap_or("m1.small").to_owned(),
                min_count: p
                    .int("MinCount")?
                    .ok_or_else(|| ApiError::missing("MinCount"))?,
                max_count: p
                    .int("MaxCount")?
                    .ok_or_else(|| ApiError::missing("MaxCount"))?,
                subnet_id: p.get("SubnetId").map(str::to_owned),
                security_groups: p.list("SecurityGroupId")?,
                private_ip: v4("PrivateIpAddress")?,
                ipv6_count: p.int("Ipv6AddressCount")?,
                tags: specs.remove("instance").unwrap_or_default(),
                eni_tags: specs.remove("network-interface").unwrap_or_default(),
                client_token: p.get("ClientToken").map(str::to_owned),
            })
        }
        "TerminateInstances" => Request::TerminateInstances {
            ids: p.list("InstanceId")?,
        },
        "DescribeInstances" => Request::DescribeInstances {
            ids: p.list("InstanceId")?,
            filters: p.filters()?,
            page: p.page()?,
        },
        "DescribeInstanceTypes" => Request::DescribeInstanceTypes {
            types: p.list("InstanceType")?,
            filters: p.filters()?,
            page: p.page()?,
        },
        "DescribeSubnets" => Request::DescribeSubnets {
            ids: p.list("SubnetId")?,
            filters: p.filters()?,
            page: p.page()?,
        },
        "DescribeNetworkInterfaces" => Request::DescribeNetworkInterfaces {
            ids: p.list("NetworkInterfaceId")?,
            filters: p.filters()?,
            page: p.page()?,
        },
        "CreateNetworkInterface" => {
            let mut private_ips = Vec::new();
            for m in p.members("PrivateIpAddresses")? {
                let a = m
                    .parsed::<Ipv4Addr>("PrivateIpAddress", "IPv4 address")?
                    .ok_or_else(|| ApiError::missing("PrivateIpAddresses.N.PrivateIpAddress"))?;
                private_ips.push((a, m.boolean("Primary")?.unwrap_or(false)));
            }
            Request::CreateNetworkInterface(CreateEni {
                subnet_id: p.req("SubnetId")?,
                description: p.get("Description").unwrap_or("").to_owned(),
                private_ip: v4("PrivateIpAddress")?,
                private_ips,
                secondary_count: p.int("SecondaryPrivateIpAddressCount")?,
                ipv4_prefix_count: p.int("Ipv4PrefixCount")?,
                ipv4_prefixes: p.list_parsed("Ipv4Prefix", "Ipv4Prefix", "IPv4 prefix")?,
                ipv6_count: p.int("Ipv6AddressCount")?,
                ipv6_addresses: p.list_parsed("Ipv6Addresses", "Ipv6Address", "IPv6 address")?,
                ipv6_prefix_count: p.int("Ipv6PrefixCount")?,
                ipv6_prefixes: p.list_parsed("Ipv6Prefix", "Ipv6Prefix", "IPv6 prefix")?,
                groups: p.list("SecurityGroupId")?,
                tags: single_tags(&["network-interface"])?,
                interface_type: p.get("InterfaceType").map(str::to_owned),
                client_token: p.get("ClientToken").map(str::to_owned),
            })
        }
        "AttachNetworkInterface" => Request::AttachNetworkInterface {
            eni_id: p.req("NetworkInterfaceId")?,
            instance_id: p.req("InstanceId")?,
            device_index: p
                .int("DeviceIndex")?
                .ok_or_else(|| ApiError::missing("DeviceIndex"))?,
            network_card_index: p.int("NetworkCardIndex")?,
        },
        "DetachNetworkInterface" => Request::DetachNetworkInterface {
            attachment_id: p.req("AttachmentId")?,
            force: p.boolean("Force")?.unwrap_or(false),
        },
        "DeleteNetworkInterface" => Request::DeleteNetworkInterface {
            eni_id: p.req("NetworkInterfaceId")?,
        },
        "ModifyNetworkInterfaceAttribute" => {
            let eni_id = p.req("NetworkInterfaceId")?;
            let mut changes = Vec::new();
            if p.map.keys().any(|k| k.starts_with("Attachment.")) {
                changes.push(EniAttribute::DeleteOnTermination {
                    attachment_id: p.req("Attachment.AttachmentId")?,
                    value: p
                        .boolean("Attachment.DeleteOnTermination")?
                        .ok_or_else(|| ApiError::missing("Attachment.DeleteOnTermination"))?,
                });
            }
            if p.map.keys().any(|k| k.starts_with("SecurityGroupId.")) {
                changes.push(EniAttribute::Groups(p.list("SecurityGroupId")?));
            }
            if let Some(d) = p.get("Description.Value") {
                changes.push(EniAttribute::Description(d.to_owned()));
            }
            if let Some(v) = p.boolean("SourceDestCheck.Value")? {
                changes.push(EniAttribute::SourceDestCheck(v));
            }
            if changes.len() > 1 {
                return Err(ApiError::combination(
                    "Fields for multiple attribute types specified.",
                ));
            }
            let change = changes
                .pop()
                .ok_or_else(|| ApiError::missing("Attribute"))?;
            Request::ModifyNetworkInterfaceAttribute { eni_id, change }
        }
        "AssignPrivateIpAddresses" => Request::AssignPrivateIpAddresses {
            eni_id: p.req("NetworkInterfaceId")?,
            count: p.int("SecondaryPrivateIpAddressCount")?,
            addresses: parse_all(&p.list("PrivateIpAddress")?, "IPv4 address")?,
            prefix_count: p.int("Ipv4PrefixCount")?,
            prefixes: parse_all(&p.list("Ipv4Prefix")?, "IPv4 prefix")?,
        },
        "UnassignPrivateIpAddresses" => Request::UnassignPrivateIpAddresses {
            eni_id: p.req("NetworkInterfaceId")?,
            addresses: parse_all(&p.list("PrivateIpAddress")?, "IPv4 address")?,
            prefixes: parse_all(&p.list("Ipv4Prefix")?, "IPv4 prefix")?,
        },
        "AssignIpv6Addresses" => Request::AssignIpv6Addresses {
            eni_id: p.req("NetworkInterfaceId")?,
            count: p.int("Ipv6AddressCount")?,
            addresses: parse_all(&p.list("Ipv6Addresses")?, "IPv6 address")?,
            prefix_count: p.int("Ipv6PrefixCount")?,
            prefixes: parse_all(&p.list("Ipv6Prefix")?, "IPv6 prefix")?,
        },
        "UnassignIpv6Addresses" => Request::UnassignIpv6Addresses {
            eni_id: p.req("NetworkInterfaceId")?,
            addresses: parse_all(&p.list("Ipv6Addresses")?, "IPv6 address")?,
            prefixes: parse_all(&p.list("Ipv6Prefix")?, "IPv6 prefix")?,
        },
        "AssociateTrunkInterface" => Request::AssociateTrunkInterface {
            branch_id: p.req("BranchInterfaceId")?,
            trunk_id: p.req("TrunkInterfaceId")?,
            vlan_id: p.int("VlanId")?,
            gre_key: p.int("GreKey")?,
            client_token: p.get("ClientToken").map(str::to_owned),
        },
        "DisassociateTrunkInterface" => Request::DisassociateTrunkInterface {
            association_id: p.req("AssociationId")?,
            client_token: p.get("ClientToken").map(str::to_owned),
        },
        "DescribeTrunkInterfaceAssociations" => Request::DescribeTrunkInterfaceAssociations {
            ids: p.list("AssociationId")?,
            filters: p.filters()?,
            page: p.page()?,
        },
        "CreateTags" => Request::CreateTags {
            ids: p.list("ResourceId")?,
            tags: p
                .tag_list("Tag")?
                .into_iter()
                .map(|(k, v)| (k, v.unwrap_or_default()))
                .collect(),
        },
        "DeleteTags" => Request::DeleteTags {
            ids: p.list("ResourceId")?,
            tags: p.tag_list("Tag")?,
        },
        other => {
            return Err(ApiError::new(
                "InvalidAction",
                format!("The action {other} is not valid for this web service."),
            ))
        }
    };
    Ok(Parsed { request, dry_run })
}

fn parse_all<T: FromStr>(v: &[String], what: &str) -> Result<Vec<T>, ApiError> {
    v.iter()
        .map(|s| {
            s.trim()
                .parse::<T>()
                .map_err(|_| ApiError::invalid(format!("Invalid value '{s}' for {what}.")))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn p(s: &str) -> Params {
        Params::from_form(s.as_bytes())
    }

    #[test]
    fn unknown_action_and_missing_action_are_ec2_errors() {
        assert_eq!(parse(&p("Action=Nope")).unwrap_err().code, "InvalidAction");
        assert_eq!(
            parse(&p("Version=2016-11-15")).unwrap_err().code,
            "MissingAction"
        );
    }

    #[test]
    fn lists_structs_and_filters_parse_in_index_order() {
        let r = parse(&p(
            "Action=DescribeNetworkInterfaces&Filter.2.Name=status&Filter.2.Value.1=available\
             &Filter.1.Name=tag-key&Filter.1.Value.1=a&Filter.1.Value.2=b&MaxResults=5",
        ))
        .expect("parses");
        let Request::DescribeNetworkInterfaces { filters, page, .. } = r.request else {
            panic!("wrong request")
        };
        assert_eq!(
            filters[0],
            Filter {
                name: "tag-key".into(),
                values: vec!["a".into(), "b".into()]
            }
        );
        assert_eq!(filters[1].name, "status");
        assert_eq!(page.max_results, Some(5));
    }

    #[test]
    fn malformed_values_and_unknown_parameters_are_rejected() {
        let e = parse(&p("Action=DescribeSubnets&MaxResults=ten")).unwrap_err();
        assert_eq!(e.code, "InvalidParameterValue");
        let e = parse(&p("Action=DescribeSubnets&Bogus=1")).unwrap_err();
        assert_eq!(e.code, "UnknownParameter");
        let e = parse(&p("Action=AssignPrivateIpAddresses")).unwrap_err();
        assert_eq!(e.code, "MissingParameter");
        let e = parse(&p("Action=AssignPrivateIpAddresses&NetworkInterfaceId=eni-1&PrivateIpAddress.1=10.0.0.300"))
            .unwrap_err();
        assert_eq!(e.code, "InvalidParameterValue");
        let e = parse(&p("Action=CreateVpc&CidrBlock=10.0.0.1/16")).unwrap_err();
        assert_eq!(e.code, "InvalidParameterValue");
    }

    #[test]
    fn trunk_calls_parse_and_name_their_bad_fields() {
        let r = parse(&p(
            "Action=AssociateTrunkInterface&BranchInterfaceId=eni-1&TrunkInterfaceId=eni-2&VlanId=7&ClientToken=t",
        ))
        .expect("parses");
        assert_eq!(
            r.request,
            Request::AssociateTrunkInterface {
                branch_id: "eni-1".into(),
                trunk_id: "eni-2".into(),
                vlan_id: Some(7),
                gre_key: None,
                client_token: Some("t".into()),
            }
        );
        let e = parse(&p(
            "Action=AssociateTrunkInterface&BranchInterfaceId=eni-1&TrunkInterfaceId=eni-2&VlanId=x",
        ))
        .unwrap_err();
        assert_eq!(e.code, "InvalidParameterValue");
        assert!(e.message.contains("VlanId"), "{}", e.message);
        let e = parse(&p("Action=AssociateTrunkInterface&TrunkInterfaceId=eni-2")).unwrap_err();
        assert_eq!(e.code, "MissingParameter");
        assert!(e.message.contains("BranchInterfaceId"), "{}", e.message);
        let e = parse(&p("Action=DisassociateTrunkInterface")).unwrap_err();
        assert!(e.message.contains("AssociationId"), "{}", e.message);
        let r = parse(&p(
            "Action=DescribeTrunkInterfaceAssociations&AssociationId.1=trunk-assoc-1&Filter.1.Name=vlan-id&Filter.1.Value.1=3&MaxResults=5",
        ))
        .expect("parses");
        let Request::DescribeTrunkInterfaceAssociations { ids, filters, page } = r.request else {
            panic!("wrong request")
        };
        assert_eq!(ids, vec!["trunk-assoc-1".to_owned()]);
        assert_eq!(filters[0].name, "vlan-id");
        assert_eq!(page.max_results, Some(5));
    }

    #[test]
    fn tag_specifications_are_split_by_resource_type() {
        let r = parse(&p(
            "Action=CreateNetworkInterface&SubnetId=subnet-1&TagSpecification.1.ResourceType=network-interface\
             &TagSpecification.1.Tag.1.Key=k&TagSpecification.1.Tag.1.Value=v&Ipv4PrefixCount=2",
        ))
        .expect("parses");
        let Request::CreateNetworkInterface(c) = r.request else {
            panic!("wrong request")
        };
        assert_eq!(c.tags.get("k").map(String::as_str), Some("v"));
        assert_eq!(c.ipv4_prefix_count, Some(2));
        let e = parse(&p(
            "Action=CreateNetworkInterface&SubnetId=subnet-1&TagSpecification.1.ResourceType=vpc",
        ))
        .unwrap_err();
        assert_eq!(e.code, "InvalidParameterValue");
    }
}
