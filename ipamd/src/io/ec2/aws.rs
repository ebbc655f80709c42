//! [`Ec2Api`] over `aws-sdk-ec2`. SDK types stay in this module: every answer is turned into
//! the trait's nouns and every failure into an [`Ec2Error`] carrying the EC2 error code.
//!
//! The SDK's own retries are off: the pool manager's pacer retries throttling, 5xx and
//! transport failures with backoff and jitter, and counts them, so one layer decides.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_ec2::config::interceptors::BeforeTransmitInterceptorContextMut;
use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::config::timeout::TimeoutConfig;
use aws_sdk_ec2::config::{ConfigBag, Intercept, Region, RuntimeComponents};
use aws_sdk_ec2::error::{BoxError, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, InstanceType, NetworkInterface, NetworkInterfaceAttachmentChanges, ResourceType, Tag,
    TagSpecification,
};

use crate::io::ec2::{
    Addresses, Assigned, Attachment, CreateEni, Ec2Api, Ec2Error, Ec2Result, EniInfo, ErrorKind,
    InstanceTypeInfo, SubnetInfo, TAG_CLUSTER_NAME, TAG_INSTANCE_ID,
};
use crate::types::{Ipv4Net, Ipv6Net};

/// The user-agent key of the reference daemon.
pub const USER_AGENT_KEY: &str = "amazon-vpc-cni-k8s";

/// How to build the EC2 client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsSettings {
    /// Region (from instance metadata or `AWS_REGION`).
    pub region: String,
    /// Endpoint override (`AWS_EC2_ENDPOINT`).
    pub endpoint: Option<String>,
    /// Per-attempt HTTP timeout (`HTTP_TIMEOUT`).
    pub http_timeout: Duration,
    /// `VPC_CNI_VERSION`, appended to the user agent as `amazon-vpc-cni-k8s/<version>`.
    pub version: String,
    /// Static credentials (access key, secret) instead of the default chain (simulator).
    pub static_credentials: Option<(String, String)>,
}

/// Appends `amazon-vpc-cni-k8s/<version>` to the User-Agent header (not signed by SigV4).
#[derive(Debug)]
struct UserAgent(String);

impl Intercept for UserAgent {
    fn name(&self) -> &'static str {
        "vpc-cni-user-agent"
    }

    fn modify_before_transmit(
        &self,
        ctx: &mut BeforeTransmitInterceptorContextMut<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let headers = ctx.request_mut().headers_mut();
        let ua = match headers.get("user-agent") {
            Some(v) => format!("{v} {}", self.0),
            None => self.0.clone(),
        };
        headers.insert("user-agent", ua);
        Ok(())
    }
}

/// An `aws-sdk-ec2` client as every binary of ours builds it: region, endpoint override,
/// per-attempt timeouts, the SDK's retries off (the caller's [`super::pacer::Pacer`]
/// retries), `user_agent` appended to the User-Agent header, credentials from the default
/// chain or the static pair.
pub async fn sdk_client(s: &AwsSettings, user_agent: &str) -> aws_sdk_ec2::Client {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(s.http_timeout)
        .operation_attempt_timeout(s.http_timeout)
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(s.region.clone()))
        .timeout_config(timeouts)
        .retry_config(RetryConfig::disabled());
    if let Some((key, secret)) = &s.static_credentials {
        loader = loader.credentials_provider(aws_credential_types::Credentials::new(
            key.clone(),
            secret.clone(),
            None,
            None,
            "vpc-cni-static",
        ));
    }
    let shared = loader.load().await;
    let mut conf =
        aws_sdk_ec2::config::Builder::from(&shared).interceptor(UserAgent(user_agent.to_owned()));
    if let Some(url) = &s.endpoint {
        conf = conf.endpoint_url(url);
    }
    aws_sdk_ec2::Client::from_conf(conf.build())
}

/// The EC2 client.
#[derive(Debug, Clone)]
pub struct AwsEc2 {
    client: aws_sdk_ec2::Client,
}

impl AwsEc2 {
    /// Builds the client ([`sdk_client`] with the reference's user agent,
    /// `amazon-vpc-cni-k8s/<version>`).
    pub async fn new(s: &AwsSettings) -> AwsEc2 {
        AwsEc2 {
            client: sdk_client(s, &format!("{USER_AGENT_KEY}/{}", s.version)).await,
        }
    }

    /// Wraps an existing client.
    pub fn from_client(client: aws_sdk_ec2::Client) -> AwsEc2 {
        AwsEc2 { client }
    }
}

/// Maps an SDK failure to our error: the EC2 code decides the kind; an answer without a code
/// is judged by its HTTP status (a coded answer the code calls a client error is a server
/// error with a 5xx status, and throttling with a 503); no answer at all is a transport
/// failure.
pub fn sdk_error<E>(
    action: &'static str,
    e: SdkError<E, aws_sdk_ec2::config::http::HttpResponse>,
) -> Ec2Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &e {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = se.err().code().unwrap_or("");
            let message = se.err().message().unwrap_or("").to_owned();
            let mut err = if code.is_empty() {
                Ec2Error::coded(action, &format!("HTTP{status}"), message)
            } else {
                Ec2Error::coded(action, code, message)
            };
            if err.kind == ErrorKind::Client && status >= 500 {
                err.kind = if status == 503 {
                    ErrorKind::Throttled
                } else {
                    ErrorKind::Server
                };
            }
            err
        }
        SdkError::ConstructionFailure(_) => Ec2Error {
            action,
            code: "ConstructionFailure".into(),
            message: source_chain(&e),
            kind: ErrorKind::Client,
        },
        SdkError::TimeoutError(_) => Ec2Error {
            action,
            code: "Timeout".into(),
            message: source_chain(&e),
            kind: ErrorKind::Transport,
        },
        _ => {
            let status = e.raw_response().map(|r| r.status().as_u16());
            Ec2Error {
                action,
                code: status.map_or_else(|| "Transport".into(), |s| format!("HTTP{s}")),
                message: source_chain(&e),
                kind: match status {
                    Some(s) if (400..500).contains(&s) => ErrorKind::Client,
                    Some(_) => ErrorKind::Server,
                    None => ErrorKind::Transport,
                },
            }
        }
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

fn tags_of(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| Some((t.key()?.to_owned(), t.value().unwrap_or("").to_owned())))
        .collect()
}

fn parse_ip(action: &'static str, s: &str) -> Ec2Result<Ipv4Addr> {
    s.parse().map_err(|_| Ec2Error {
        action,
        code: "BadAnswer".into(),
        message: format!("not an IPv4 address: {s}"),
        kind: ErrorKind::Client,
    })
}

fn parse_net6(action: &'static str, s: &str) -> Ec2Result<Ipv6Net> {
    s.parse().map_err(|_| Ec2Error {
        action,
        code: "BadAnswer".into(),
        message: format!("not an IPv6 CIDR: {s}"),
        kind: ErrorKind::Client,
    })
}

fn parse_net(action: &'static str, s: &str) -> Ec2Result<Ipv4Net> {
    s.parse().map_err(|_| Ec2Error {
        action,
        code: "BadAnswer".into(),
        message: format!("not an IPv4 CIDR: {s}"),
        kind: ErrorKind::Client,
    })
}

fn eni_of(action: &'static str, n: &NetworkInterface) -> Ec2Result<EniInfo> {
    let mut primary_ip = None;
    let mut secondary_ips = Vec::new();
    for a in n.private_ip_addresses() {
        let Some(ip) = a.private_ip_address() else {
            continue;
        };
        let ip = parse_ip(action, ip)?;
        if a.primary() == Some(true) {
            primary_ip = Some(ip);
        } else {
            secondary_ips.push(ip);
        }
    }
    if primary_ip.is_none() {
        primary_ip = n
            .private_ip_address()
            .map(|s| parse_ip(action, s))
            .transpose()?;
    }
    let prefixes = n
        .ipv4_prefixes()
        .iter()
        .filter_map(|p| p.ipv4_prefix())
        .map(|p| parse_net(action, p))
        .collect::<Ec2Result<Vec<_>>>()?;
    let ipv6_prefixes = n
        .ipv6_prefixes()
        .iter()
        .filter_map(|p| p.ipv6_prefix())
        .map(|p| parse_net6(action, p))
        .collect::<Ec2Result<Vec<_>>>()?;
    let attachment = n.attachment().and_then(|a| {
        Some(Attachment {
            id: a.attachment_id()?.to_owned(),
            instance_id: a.instance_id().unwrap_or("").to_owned(),
            device_index: a.device_index().unwrap_or(0).max(0) as u32,
            network_card: a.network_card_index().unwrap_or(0).max(0) as u32,
        })
    });
    Ok(EniInfo {
        id: n.network_interface_id().unwrap_or("").to_owned(),
        mac: n.mac_address().unwrap_or("").to_ascii_lowercase(),
        subnet_id: n.subnet_id().unwrap_or("").to_owned(),
        vpc_id: n.vpc_id().unwrap_or("").to_owned(),
        status: n
            .status()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
        description: n.description().unwrap_or("").to_owned(),
        interface_type: n
            .interface_type()
            .map(|t| t.as_str().to_owned())
            .unwrap_or_else(|| "interface".into()),
        primary_ip,
        secondary_ips,
        prefixes,
        ipv6_prefixes,
        tags: tags_of(n.tag_set()),
        security_groups: n
            .groups()
            .iter()
            .filter_map(|g| g.group_id().map(str::to_owned))
            .collect(),
        attachment,
    })
}

/// The largest `maximumNetworkInterfaces` and `ipv4AddressesPerInterface` taken.
const MAX_TYPE_LIMIT: i32 = 1024;

/// The most pages one paginated describe reads (1,000 of up to 1,000 ENIs).
const MAX_PAGES: usize = 1000;

fn count(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

#[async_trait::async_trait]
impl Ec2Api for AwsEc2 {
    async fn describe_enis(&self, ids: &[String]) -> Ec2Result<Vec<EniInfo>> {
        const A: &str = "DescribeNetworkInterfaces";
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let out = self
            .client
            .describe_network_interfaces()
            .set_network_interface_ids(Some(ids.to_vec()))
            .send()
            .await
            .map_err(|e| sdk_error(A, e))?;
        out.network_interfaces()
            .iter()
            .map(|n| eni_of(A, n))
            .collect()
    }

    async fn describe_leaked_candidates(
        &self,
        vpc_id: &str,
        cluster: Option<&str>,
    ) -> Ec2Result<Vec<EniInfo>> {
        const A: &str = "DescribeNetworkInterfaces";
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        let mut tokens = std::collections::HashSet::new();
        loop {
            if tokens.len() >= MAX_PAGES {
                return Err(Ec2Error::coded(
                    A,
                    "BadAnswer",
                    format!("more than {MAX_PAGES} pages of answers: pagination does not end"),
                ));
            }
            let mut req = self
                .client
                .describe_network_interfaces()
                .max_results(1000)
                .filters(filter("tag-key", TAG_INSTANCE_ID))
                .filters(filter("status", "available"))
                .filters(filter("vpc-id", vpc_id))
                .set_next_token(token.take());
            if let Some(c) = cluster {
                req = req.filters(filter(&format!("tag:{TAG_CLUSTER_NAME}"), c));
            }
            let page = req.send().await.map_err(|e| sdk_error(A, e))?;
            for n in page.network_interfaces() {
                out.push(eni_of(A, n)?);
            }
            match page.next_token() {
                Some(t) if !t.is_empty() => {
                    if !tokens.insert(t.to_owned()) {
                        return Err(Ec2Error::coded(
                            A,
                            "BadAnswer",
                            format!("NextToken {t:?} came twice: pagination does not end"),
                        ));
                    }
                    token = Some(t.to_owned());
                }
                _ => return Ok(out),
            }
        }
    }

    async fn used_device_indexes(&self, instance_id: &str) -> Ec2Result<Vec<(u32, u32)>> {
        const A: &str = "DescribeInstances";
        let out = self
            .client
            .describe_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(|e| sdk_error(A, e))?;
        Ok(out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .flat_map(|i| i.network_interfaces())
            .filter_map(|n| n.attachment())
            .map(|a| {
                (
                    a.network_card_index().unwrap_or(0).max(0) as u32,
                    a.device_index().unwrap_or(0).max(0) as u32,
                )
            })
            .collect())
    }

    async fn describe_instance_type(&self, instance_type: &str) -> Ec2Result<InstanceTypeInfo> {
        const A: &str = "DescribeInstanceTypes";
        let out = self
            .client
            .describe_instance_types()
            .instance_types(InstanceType::from(instance_type))
            .send()
            .await
            .map_err(|e| sdk_error(A, e))?;
        let unknown = || {
            Ec2Error::coded(
                A,
                "InvalidInstanceType",
                format!("unknown instance type {instance_type}"),
            )
        };
        let t = out.instance_types().first().ok_or_else(unknown)?;
        let ni = t.network_info().ok_or_else(unknown)?;
        let max_enis = ni.maximum_network_interfaces().unwrap_or(0);
        let per_eni = ni.ipv4_addresses_per_interface().unwrap_or(0);
        if max_enis <= 0 || per_eni <= 0 {
            return Err(unknown());
        }
        // Far above any instance type, and low enough that the pool's arithmetic
        // (addresses per ENI × 16 in prefix mode × ENIs) cannot overflow.
        for (element, v) in [
            ("maximumNetworkInterfaces", max_enis),
            ("ipv4AddressesPerInterface", per_eni),
        ] {
            if v > MAX_TYPE_LIMIT {
                return Err(Ec2Error::coded(
                    A,
                    "BadAnswer",
                    format!("{element} {v} is above {MAX_TYPE_LIMIT}"),
                ));
            }
        }
        Ok(InstanceTypeInfo {
            max_enis: max_enis as u32,
            ipv4_per_eni: per_eni as u32,
            hypervisor: t
                .hypervisor()
                .map(|h| h.as_str().to_owned())
                .unwrap_or_default(),
            bare_metal: t.bare_metal().unwrap_or(false),
        })
    }

    async fn describe_subnets(&self, vpc_id: &str, az: &str) -> Ec2Result<Vec<SubnetInfo>> {
        const A: &str = "DescribeSubnets";
        let out = self
            .client
            .describe_subnets()
            .filters(filter("vpc-id", vpc_id))
            .filters(filter("availability-zone", az))
            .send()
            .await
            .map_err(|e| sdk_error(A, e))?;
        let mut subnets = out
            .subnets()
            .iter()
            .map(|s| {
                Ok(SubnetInfo {
                    id: s.subnet_id().unwrap_or("").to_owned(),
                    cidr: parse_net(A, s.cidr_block().unwrap_or(""))?,
                    available: s.available_ip_address_count().unwrap_or(0).max(0) as u64,
                    tags: tags_of(s.tags()),
                })
            })
            .collect::<Ec2Result<Vec<_>>>()?;
        subnets.sort_by_key(|s| std::cmp::Reverse(s.available));
        Ok(subnets)
    }

    async fn create_eni(&self, req: &CreateEni) -> Ec2Result<EniInfo> {
        const A: &str = "CreateNetworkInterface";
        let mut groups = req.security_groups.clone();
        groups.sort();
        let tags = TagSpecification::builder()
            .resource_type(ResourceType::NetworkInterface)
            .set_tags(Some(
                req.tags
                    .iter()
                    .map(|(k, v)| Tag::builder().key(k).value(v).build())
                    .collect(),
            ))
            .build();
        let mut call = self
            .client
            .create_network_interface()
            .subnet_id(&req.subnet_id)
            .description(&req.description)
            .set_groups((!groups.is_empty()).then_some(groups))
            .tag_specifications(tags);
        call = match req.addresses {
            Addresses::Ips(n) if n > 0 => call.secondary_private_ip_address_count(count(n)),
            Addresses::Prefixes(n) if n > 0 => call.ipv4_prefix_count(count(n)),
            _ => call,
        };
        let out = call.send().await.map_err(|e| sdk_error(A, e))?;
        let n = out
            .network_interface()
            .ok_or_else(|| Ec2Error::coded(A, "BadAnswer", "no NetworkInterface in the answer"))?;
        eni_of(A, n)
    }

    async fn attach_eni(
        &self,
        eni_id: &str,
        instance_id: &str,
        device_index: u32,
        network_card: u32,
    ) -> Ec2Result<String> {
        const A: &str = "AttachNetworkInterface";
        let out = self
            .client
            .attach_network_interface()
            .network_interface_id(eni_id)
            .instance_id(instance_id)
            .device_index(count(device_index))
            .network_card_index(count(network_card))
            .send()
            .await
            .map_err(|e| sdk_error(A, e))?;
        out.attachment_id()
            .map(str::to_owned)
            .ok_or_else(|| Ec2Error::coded(A, "BadAnswer", "no AttachmentId in the answer"))
    }

    async fn set_delete_on_termination(&self, eni_id: &str, attachment_id: &str) -> Ec2Result<()> {
        const A: &str = "ModifyNetworkInterfaceAttribute";
        self.client
            .modify_network_interface_attribute()
            .network_interface_id(eni_id)
            .attachment(
                NetworkInterfaceAttachmentChanges::builder()
                    .attachment_id(attachment_id)
                    .delete_on_termination(true)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| sdk_error(A, e))?;
        Ok(())
    }

    async fn detach_eni(&self, attachment_id: &str) -> Ec2Result<()> {
        const A: &str = "DetachNetworkInterface";
        self.client
            .detach_network_interface()
            .attachment_id(attachment_id)
            .send()
            .await
            .map_err(|e| sdk_error(A, e))?;
        Ok(())
    }

    async fn delete_eni(&self, eni_id: &str) -> Ec2Result<()> {
        const A: &str = "DeleteNetworkInterface";
        self.client
            .delete_network_interface()
            .network_interface_id(eni_id)
            .send()
            .await
            .map_err(|e| sdk_error(A, e))?;
        Ok(())
    }

    async fn assign(&self, eni_id: &str, what: Addresses) -> Ec2Result<Assigned> {
        const A: &str = "AssignPrivateIpAddresses";
        let call = self
            .client
            .assign_private_ip_addresses()
            .network_interface_id(eni_id);
        let call = match what {
            Addresses::Ips(n) => call.secondary_private_ip_address_count(count(n)),
            Addresses::Prefixes(n) => call.ipv4_prefix_count(count(n)),
        };
        let out = call.send().await.map_err(|e| sdk_error(A, e))?;
        Ok(Assigned {
            ips: out
                .assigned_private_ip_addresses()
                .iter()
                .filter_map(|a| a.private_ip_address())
                .map(|s| parse_ip(A, s))
                .collect::<Ec2Result<_>>()?,
            prefixes: out
                .assigned_ipv4_prefixes()
                .iter()
                .filter_map(|p| p.ipv4_prefix())
                .map(|s| parse_net(A, s))
                .collect::<Ec2Result<_>>()?,
        })
    }

    async fn unassign_ips(&self, eni_id: &str, ips: &[Ipv4Addr]) -> Ec2Result<()> {
        const A: &str = "UnassignPrivateIpAddresses";
        self.client
            .unassign_private_ip_addresses()
            .network_interface_id(eni_id)
            .set_private_ip_addresses(Some(ips.iter().map(ToString::to_string).collect()))
            .send()
            .await
            .map_err(|e| sdk_error(A, e))?;
        Ok(())
    }

    async fn unassign_prefixes(&self, eni_id: &str, prefixes: &[Ipv4Net]) -> Ec2Result<()> {
        const A: &str = "UnassignPrivateIpAddresses";
        self.client
            .unassign_private_ip_addresses()
            .network_interface_id(eni_id)
            .set_ipv4_prefixes(Some(prefixes.iter().map(ToString::to_string).collect()))
            .send()
            .await
            .map_err(|e| sdk_error(A, e))?;
        Ok(())
    }

    async fn assign_ipv6_prefixes(&self, eni_id: &str, n: u32) -> Ec2Result<Vec<Ipv6Net>> {
        const A: &str = "AssignIpv6Addresses";
        let out = self
            .client
            .assign_ipv6_addresses()
            .network_interface_id(eni_id)
            .ipv6_prefix_count(count(n))
            .send()
            .await
            .map_err(|e| sdk_error(A, e))?;
        out.assigned_ipv6_prefixes()
            .iter()
            .map(|s| parse_net6(A, s))
            .collect()
    }

    async fn unassign_ipv6_prefixes(&self, eni_id: &str, prefixes: &[Ipv6Net]) -> Ec2Result<()> {
        const A: &str = "UnassignIpv6Addresses";
        self.client
            .unassign_ipv6_addresses()
            .network_interface_id(eni_id)
            .set_ipv6_prefixes(Some(prefixes.iter().map(ToString::to_string).collect()))
            .send()
            .await
            .map_err(|e| sdk_error(A, e))?;
        Ok(())
    }

    async fn create_tags(&self, resource: &str, tags: &BTreeMap<String, String>) -> Ec2Result<()> {
        const A: &str = "CreateTags";
        self.client
            .create_tags()
            .resources(resource)
            .set_tags(Some(
                tags.iter()
                    .map(|(k, v)| Tag::builder().key(k).value(v).build())
                    .collect(),
            ))
            .send()
            .await
            .map_err(|e| sdk_error(A, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves one canned EC2 error answer per connection, forever.
    async fn error_server(status: u16, code: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    // One request: headers and a small form body arrive together.
                    let _ = sock.read(&mut buf).await;
                    let body = format!(
                        "<?xml version=\"1.0\"?><Response><Errors><Error><Code>{code}</Code>\
                         <Message>canned</Message></Error></Errors>\
                         <RequestID>r-1</RequestID></Response>"
                    );
                    let head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: text/xml\r\ncontent-length: {}\r\n\
                         connection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = sock.write_all(head.as_bytes()).await;
                    let _ = sock.write_all(body.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}")
    }

    async fn kind_of(status: u16, code: &'static str) -> (String, ErrorKind) {
        let url = error_server(status, code).await;
        let settings = AwsSettings {
            region: "us-east-1".into(),
            endpoint: Some(url),
            http_timeout: Duration::from_secs(5),
            version: "test".into(),
            static_credentials: Some(("AKIDEXAMPLE".into(), "secret".into())),
        };
        let ec2 = AwsEc2::new(&settings).await;
        let e = ec2
            .describe_instance_type("m5.large")
            .await
            .expect_err("the server only fails");
        (e.code, e.kind)
    }

    #[tokio::test]
    async fn the_code_decides_and_the_status_corrects_a_client_kind() {
        assert_eq!(
            kind_of(400, "InvalidParameterValue").await,
            ("InvalidParameterValue".into(), ErrorKind::Client)
        );
        assert_eq!(
            kind_of(400, "RequestLimitExceeded").await,
            ("RequestLimitExceeded".into(), ErrorKind::Throttled)
        );
        // A code we do not know, with a 5xx status: a server error, and throttling on 503
        // (an earlier version never reached the 503 case).
        assert_eq!(
            kind_of(500, "SomethingNew").await,
            ("SomethingNew".into(), ErrorKind::Server)
        );
        assert_eq!(
            kind_of(503, "SlowDown").await,
            ("SlowDown".into(), ErrorKind::Throttled)
        );
    }
}
